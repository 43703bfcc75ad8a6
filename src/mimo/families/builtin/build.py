"""The built-in family's provider: per modality its reference encoder and an MLP projector, then the decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from mimo.data.synthetic import ModalitySpec
from mimo.families.builtin.section import BuiltinSection
from mimo.families.family import BuildSettings, HFSource
from mimo.flops import EncoderFormula, ModalityFlops, audio_flops, modalities_from_provider, vit_flops
from mimo.models import (
    AudioConfig,
    AudioEncoder,
    Decoder,
    DecoderConfig,
    MLPProjector,
    ModalitySubmodule,
    ViTConfig,
    ViTEncoder,
)
from mimo.provider import MimoModelProvider, ModuleSpec


@dataclass(frozen=True)
class Encoder:
    """A modality's reference encoder: its module, config presets, FLOP formula and generated items."""

    module: type[nn.Module]
    presets: dict[str, Callable[[], Any]]
    formula: EncoderFormula
    synthetic: Callable[[int, Any], ModalitySpec]  # (token id, config) -> the generated items' spec


ENCODERS = {
    "images": Encoder(ViTEncoder, {"tiny": ViTConfig.tiny, "clip-vit-l14-336": ViTConfig.clip_vit_l14_336},
                      vit_flops, lambda token, c: ModalitySpec.image(token, c.tokens_per_item, size=c.image_size,
                                                                     channels=c.num_channels)),
    "audio": Encoder(AudioEncoder, {"tiny": AudioConfig.tiny}, audio_flops,
                     lambda token, c: ModalitySpec.audio(token, c.tokens_per_item, n_mels=c.n_mels,
                                                         frames=c.num_frames)),
}


def open_model(section: BuiltinSection) -> None:
    """Nothing to open: the shapes are presets and the weights are seeded."""
    return None


def build_provider(section: BuiltinSection, opened: None, settings: BuildSettings) -> MimoModelProvider:
    """The decoder of the `language` preset and each modality's encoder + projector; each modality's special token
    is an id past the vocabulary (images first)."""
    language = DecoderConfig.tiny() if section.language == "tiny" else DecoderConfig.preset(section.language)
    specs, tokens = {}, {}
    for i, name in enumerate(section.modalities):
        encoder = ENCODERS[name]
        config = encoder.presets[getattr(section, name)]()
        specs[name] = ModuleSpec(ModalitySubmodule, submodules={
            "encoder": ModuleSpec(encoder.module, {"config": config}),
            "projection": ModuleSpec(MLPProjector, {"in_features": config.hidden_size,
                                                    "out_features": language.hidden_size,
                                                    "hidden_features": language.hidden_size}),
        })
        tokens[name] = language.vocab_size + i
    return MimoModelProvider(ModuleSpec(Decoder, {"config": language}), specs, tokens,
                             mimo_parallelism_config=settings.layout,
                             freeze_language_model=section.freeze_language_model,
                             freeze_modality_encoders={m: m in section.freeze_encoders for m in specs},
                             freeze_modality_projections={m: m in section.freeze_projections for m in specs},
                             params_dtype=settings.params_dtype, seed=settings.seed, device=settings.device)


def hf_sources(section: BuiltinSection) -> list[HFSource]:
    """None: every weight is seeded, so every checkpoint holds them all."""
    return []


def synthetic_modalities(provider: MimoModelProvider) -> dict[str, ModalitySpec]:
    """Generated items of each modality, shaped for its encoder, behind its special token."""
    return {name: ENCODERS[name].synthetic(provider.special_token_ids[name], _config(spec))
            for name, spec in provider.modality_submodules_spec.items()}


def modality_flops(provider: MimoModelProvider) -> dict[str, ModalityFlops]:
    """Each modality counted by its encoder's formula."""
    formulas = {name: ENCODERS[name].formula for name in provider.modality_submodules_spec}
    return modalities_from_provider(provider, formulas)


def _config(spec: ModuleSpec) -> Any:
    """A modality spec's encoder config."""
    return spec.submodules["encoder"].params["config"]
