"""Hugging Face checkpoints: config mapping, sliced loading onto any layout, export, generation."""
