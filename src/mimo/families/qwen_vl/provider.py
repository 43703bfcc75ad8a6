"""`QwenVLMimoProvider`: Qwen2.5-VL's or Qwen3-VL's vision tower (with its patch merger, on packed images of any
size) feeding a Qwen2 / Qwen3 decoder with M-RoPE (and Qwen3-VL's DeepStack); one modality, images."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mimo.config import MimoParallelismConfig
from mimo.data.positions import MRopePositions
from mimo.families.qwen_vl.hf_config import QwenVLSpec
from mimo.families.qwen_vl.hf_load import IMAGES
from mimo.models import Decoder, ModalitySubmodule
from mimo.models.init import ParameterSource
from mimo.models.qwen_vision import (
    JoinDeepStack,
    Qwen3VisionConfig,
    Qwen3VisionTower,
    Qwen25VisionTower,
    QwenVisionConfig,
)
from mimo.provider import MimoModelProvider, ModuleSpec, with_flag


class QwenVLMimoProvider(MimoModelProvider):
    """A Qwen-VL model from its `QwenVLSpec`: the tower is the images' encoder (its merger included, so the
    projection only joins DeepStack's features to the tokens), the decoder the language model."""

    MODALITY = IMAGES

    def __init__(
        self,
        spec: QwenVLSpec,
        mimo_parallelism_config: MimoParallelismConfig | None = None,
        freeze_language_model: bool = False,
        freeze_vision_encoder: bool = False,
        params_dtype: torch.dtype = torch.float32,
        seed: int = 1234,
        device: torch.device | str | None = None,
        freeze_modality_encoders: Mapping[str, bool] | None = None,
        initial_weights: ParameterSource | None = None,
    ) -> None:
        """Specs from the spec's configs; the image token is the spec's."""
        self.spec = spec
        self.text_positions = MRopePositions(self.MODALITY, spec.image_token_id, spec.vision.spatial_merge_size)
        tower = Qwen3VisionTower if isinstance(spec.vision, Qwen3VisionConfig) else Qwen25VisionTower
        images = ModuleSpec(ModalitySubmodule, submodules={
            "encoder": ModuleSpec(tower, {"config": spec.vision}),
            "projection": ModuleSpec(JoinDeepStack),
        })
        super().__init__(
            language_model_spec=ModuleSpec(Decoder, {"config": spec.language}),
            modality_submodules_spec={self.MODALITY: images},
            special_token_ids={self.MODALITY: spec.image_token_id},
            mimo_parallelism_config=mimo_parallelism_config,
            freeze_language_model=freeze_language_model,
            freeze_modality_encoders=with_flag(freeze_modality_encoders, self.MODALITY, freeze_vision_encoder),
            params_dtype=params_dtype,
            seed=seed,
            device=device,
            initial_weights=initial_weights,
        )

    @property
    def vision_config(self) -> QwenVisionConfig:
        """The tower's config (the spec's)."""
        return self.spec.vision

    def embedding_widths(self) -> dict[str, int]:
        """The images' rows carry DeepStack's features beside each token: H·(1 + k) wide (Qwen3-VL)."""
        language = self.spec.language
        return {self.MODALITY: language.hidden_size * (1 + len(language.deepstack_layers))}
