"""The LLaVA family's `model` section: a preset, or Hugging Face directories, and what to freeze."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mimo.config import RunConfigError


@dataclass
class LlavaSection:
    """A LLaVA preset and what to freeze (LLaVA stage 1: freeze_vision_encoder and freeze_language_model).

    Or local Hugging Face directories instead of the preset: `hf` (a whole LlavaForConditionalGeneration) or
    `vision_hf` (CLIP / SigLIP) with `language_hf` (Llama / Mistral / Qwen2) and a freshly seeded projector,
    whose tower output is `vision_feature_layer` under `vision_feature_select_strategy` (LLaVA's meanings).
    """

    family: Literal["llava"] = "llava"
    preset: Literal["tiny", "1b", "3b", "7b", "llava-1.5-7b"] = "tiny"  # llava-1.5-7b: that model's exact shapes
    freeze_language_model: bool = False
    freeze_vision_encoder: bool = False
    freeze_projection: bool = False
    hf: str | None = None
    vision_hf: str | None = None
    language_hf: str | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"

    def __post_init__(self) -> None:
        """`hf`, or `vision_hf` with `language_hf`, or neither (the preset)."""
        pair = (self.vision_hf, self.language_hf)
        if self.hf is not None and pair != (None, None):
            raise RunConfigError("model: give either hf (a whole LLaVA directory) or vision_hf with language_hf, "
                                 "not both")
        if self.hf is None and pair != (None, None) and None in pair:
            missing = "language_hf" if self.language_hf is None else "vision_hf"
            raise RunConfigError(f"model: vision_hf and language_hf go together; {missing} is missing")

    @property
    def text_directory(self) -> str | None:
        """The directory holding the tokenizer (and chat template): the whole model's or the language model's."""
        return self.hf or self.language_hf

    @property
    def image_directory(self) -> str | None:
        """The directory holding the image processor's preprocessor_config.json."""
        return self.hf or self.vision_hf
