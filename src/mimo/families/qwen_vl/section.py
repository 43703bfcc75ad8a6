"""The Qwen-VL family's `model` section: a Qwen2.5-VL / Qwen3-VL directory, or a preset's shapes, and what to
freeze."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PRESETS = ("tiny-qwen2.5-vl", "tiny-qwen3-vl", "qwen2.5-vl-7b", "qwen3-vl-8b")


@dataclass
class QwenVLSection:
    """`hf`: a local `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration` directory (what
    `save_pretrained` writes); else `preset`: the shapes of one, seeded (tiny ones train on a CPU; the 7B/8B ones
    are the public models' shapes, for benchmarks). The tower includes its patch merger (Qwen's projection)."""

    family: Literal["qwen_vl"] = "qwen_vl"  # the model family: Qwen2.5-VL / Qwen3-VL
    # seeded shapes when hf is null: tiny ones train on a CPU; the 7B / 8B ones are the public models' shapes
    preset: Literal["tiny-qwen2.5-vl", "tiny-qwen3-vl", "qwen2.5-vl-7b", "qwen3-vl-8b"] = "tiny-qwen2.5-vl"
    hf: str | None = None  # a local Qwen2_5_VL / Qwen3VL ForConditionalGeneration directory (instead of the preset)
    freeze_language_model: bool = False  # the language model's weights do not train
    freeze_vision_encoder: bool = False  # the vision tower's weights (its patch merger included) do not train
