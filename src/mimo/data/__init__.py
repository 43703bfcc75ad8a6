"""Batches, samplers and the built-in datasets."""
