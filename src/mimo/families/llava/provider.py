"""`LlavaMimoProvider` (Megatron-Bridge's name): a CLIP-style ViT and an MLP projector feeding a Llama-style decoder,
one modality, images; with presets of the benchmark shapes and LLaVA-1.5-7B's."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from mimo.config import MimoParallelismConfig
from mimo.families.llava.hf_presets import HF_PRESETS, hf_preset
from mimo.models import Decoder, DecoderConfig, MLPProjector, ModalitySubmodule, ViTConfig, ViTEncoder
from mimo.models.init import ParameterSource
from mimo.provider import MimoModelProvider, ModuleSpec, ProviderError, with_flag

IMAGES = "images"  # the modality LLaVA has: its module name, special token and batch key


class LlavaMimoProvider(MimoModelProvider):
    """LLaVA: a CLIP-style ViT and a 2-layer MLP projector feeding a Llama-style decoder; one modality, images.

    Defaults are LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 px (576 image tokens) and Vicuna-7B.
    """

    MODALITY = IMAGES
    PRESETS = ("tiny", "1b", "3b", "7b", "llava-1.5-7b")  # the last: llava-hf/llava-1.5-7b-hf's config.json

    def __init__(
        self,
        vision_config: ViTConfig | None = None,
        language_config: DecoderConfig | None = None,
        image_token_id: int | None = None,
        mimo_parallelism_config: MimoParallelismConfig | None = None,
        freeze_language_model: bool = False,
        freeze_vision_encoder: bool = False,
        freeze_projection: bool = False,
        params_dtype: torch.dtype = torch.float32,
        seed: int = 1234,
        device: torch.device | str | None = None,
        freeze_modality_encoders: Mapping[str, bool] | None = None,
        freeze_modality_projections: Mapping[str, bool] | None = None,
        projector_activation: str = "gelu",
        projector_bias: bool = True,
        initial_weights: ParameterSource | None = None,
    ) -> None:
        """Specs from the two configs; the image token defaults to the first id past the vocabulary.

        The base provider's per-modality `freeze_modality_encoders` / `freeze_modality_projections` are
        taken too (as Megatron-Bridge's subclass does); a part is frozen if either way says so."""
        self.vision_config = vision_config or ViTConfig.clip_vit_l14_336()
        language_config = language_config or DecoderConfig.preset("7b")
        self.image_token_id = language_config.vocab_size if image_token_id is None else image_token_id
        h_vision, h_language = self.vision_config.hidden_size, language_config.hidden_size
        images = ModuleSpec(ModalitySubmodule, submodules={
            "encoder": ModuleSpec(ViTEncoder, {"config": self.vision_config}),
            "projection": ModuleSpec(MLPProjector, {"in_features": h_vision, "out_features": h_language,
                                                    "hidden_features": h_language,
                                                    "activation": projector_activation, "bias": projector_bias}),
        })
        super().__init__(
            language_model_spec=ModuleSpec(Decoder, {"config": language_config}),
            modality_submodules_spec={self.MODALITY: images},
            special_token_ids={self.MODALITY: self.image_token_id},
            mimo_parallelism_config=mimo_parallelism_config,
            freeze_language_model=freeze_language_model,
            freeze_modality_encoders=with_flag(freeze_modality_encoders, self.MODALITY, freeze_vision_encoder),
            freeze_modality_projections=with_flag(freeze_modality_projections, self.MODALITY, freeze_projection),
            params_dtype=params_dtype,
            seed=seed,
            device=device,
            initial_weights=initial_weights,
        )
        self.projector_activation, self.projector_bias = projector_activation, projector_bias

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlavaMimoProvider:
        """`tiny` (CPU, seconds), `1b` / `3b` (the GPU benchmark shapes) or `7b` (LLaVA-1.5-7B); any argument
        of the constructor may be overridden."""
        if name not in cls.PRESETS:
            raise ProviderError(f"unknown LLaVA preset {name!r}; presets are {list(cls.PRESETS)}")
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ProviderError(f"unknown override(s) {unknown} for LlavaMimoProvider.preset; allowed: {allowed}")
        if name in HF_PRESETS:
            spec = hf_preset(name)
            kwargs: dict[str, Any] = {"vision_config": spec.vision, "language_config": spec.language,
                                      "image_token_id": spec.image_token_id,
                                      "projector_activation": spec.projector_activation,
                                      "projector_bias": spec.projector_bias}
        else:
            vision = ViTConfig.tiny() if name == "tiny" else ViTConfig.clip_vit_l14_336()
            kwargs = {"vision_config": vision, "language_config": DecoderConfig.preset(name)}
        kwargs.update(overrides)
        return cls(**kwargs)

    def num_params(self) -> dict[str, int]:
        """Closed-form parameter counts: vision encoder, projection, language model."""
        h_v, h_l = self.vision_config.hidden_size, self.language_config.hidden_size
        return {
            "vision_encoder": self.vision_config.num_params(),
            "projection": h_v * h_l + h_l * h_l + (2 * h_l if self.projector_bias else 0),
            "language_model": self.language_config.num_params(),
        }
