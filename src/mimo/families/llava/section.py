"""The LLaVA family's `model` section: a preset, or Hugging Face directories, and what to freeze."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mimo.config import RunConfigError


@dataclass
class LlavaSection:
    """A LLaVA preset and what to freeze (LLaVA stage 1: freeze_vision_encoder and freeze_language_model).

    Or local Hugging Face directories instead of the preset: `hf` (a whole LlavaForConditionalGeneration) or
    `vision_hf` (CLIP / SigLIP) with `language_hf` (Llama / Mistral / Qwen2) and a freshly seeded projector,
    whose tower output is `vision_feature_layer` under `vision_feature_select_strategy` (LLaVA's meanings).
    """

    family: Literal["llava"] = "llava"  # the model family (llava when the model section leaves it out)
    # seeded shapes without Hugging Face weights (used when hf / vision_hf are null); llava-1.5-7b: that model's
    # exact shapes
    preset: Literal["tiny", "1b", "3b", "7b", "llava-1.5-7b"] = "tiny"
    freeze_language_model: bool = False  # the language model's weights do not train
    freeze_vision_encoder: bool = False  # the vision tower's weights do not train
    freeze_projection: bool = False  # the projector's weights do not train
    hf: str | None = None  # a local LlavaForConditionalGeneration directory (instead of the preset)
    vision_hf: str | None = None  # a local CLIP / SigLIP vision directory, with language_hf
    language_hf: str | None = None  # a local Llama / Mistral / Qwen2 directory, with vision_hf
    # with vision_hf: the vision tower's hidden layer the projector reads (LLaVA's meaning: -2 the penultimate)
    vision_feature_layer: int = -2
    # with vision_hf: default drops the tower's class token, full keeps it (LLaVA's meanings)
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    # with hf / language_hf (Megatron's name): null pads only a vocabulary the language model's TP size does not
    # divide (32001 after an added pad token), to a multiple of 128 and TP; N pads every one to a multiple of N and
    # TP, TP 1 too (the same shapes on every layout: a run then moves to TP 1). Padded ids are never scored,
    # generated or exported
    make_vocab_size_divisible_by: int | None = field(default=None, metadata={"min": 1})

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
