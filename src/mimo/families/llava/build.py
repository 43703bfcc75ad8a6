"""From a LLaVA `model` section to a provider: its Hugging Face directories read once, or a preset's shapes."""

from __future__ import annotations

from mimo.config import LANGUAGE as LANGUAGE_MODULE
from mimo.config import RunConfigError
from mimo.data.synthetic import ModalitySpec
from mimo.families.family import BuildSettings, HFSource
from mimo.families.llava.hf_load import LANGUAGE, PROJECTOR, VISION, HFModel, open_llava, open_pair
from mimo.families.llava.provider import IMAGES, LlavaMimoProvider
from mimo.families.llava.section import LlavaSection
from mimo.flops import ModalityFlops, modalities_from_provider, vit_flops
from mimo.hf.config import HFConfigError
from mimo.hf.load import HFLoadError
from mimo.models.decoder import DecoderConfig


def open_model(section: LlavaSection) -> HFModel | None:
    """The Hugging Face model the section names (configs mapped and checked, weight names indexed), or None for
    a preset; a bad directory is one line naming it."""
    try:
        if section.hf is not None:
            return open_llava(section.hf)
        if section.vision_hf is not None:
            return open_pair(section.vision_hf, section.language_hf, feature_layer=section.vision_feature_layer,
                             strategy=section.vision_feature_select_strategy)
    except (HFConfigError, HFLoadError) as e:
        raise RunConfigError(f"model: {e}") from None
    return None


def build_provider(section: LlavaSection, opened: HFModel | None, settings: BuildSettings) -> LlavaMimoProvider:
    """The provider of the section's model: the directories' shapes (each rank then reading its shards of their
    weights; a fresh projector seeded as any mimo parameter; a vocabulary the language TP size does not divide
    padded), else the preset's."""
    common = {"mimo_parallelism_config": settings.layout, "freeze_language_model": section.freeze_language_model,
              "freeze_vision_encoder": section.freeze_vision_encoder, "freeze_projection": section.freeze_projection,
              "params_dtype": settings.params_dtype, "seed": settings.seed, "device": settings.device}
    if opened is not None:
        language = _padded(opened.spec.language, section, settings)
        return LlavaMimoProvider(**opened.provider_kwargs(language), **common)
    return LlavaMimoProvider.preset(section.preset, **common)  # mimo's own vocabularies: 256, 32000


def _padded(language: DecoderConfig, section: LlavaSection, settings: BuildSettings) -> DecoderConfig:
    """The language model's config with its vocabulary padded for the layout's language TP size, if it does not
    divide it (`model.make_vocab_size_divisible_by`); a whole-model build (no layout) pads nothing."""
    module = settings.layout.module_parallelisms.get(LANGUAGE_MODULE) if settings.layout is not None else None
    tp = module.tensor_model_parallel_size if module is not None else 1
    return language.padded_for(tp, section.make_vocab_size_divisible_by)


def hf_sources(section: LlavaSection) -> list[HFSource]:
    """The parts read from Hugging Face directories: all three from `hf`; the tower and the language model from
    a pair (whose projector is seeded, so always saved)."""
    parts = []
    for part, prefix, frozen, own in (("vision_encoder", VISION, section.freeze_vision_encoder, "vision_hf"),
                                      ("projector", PROJECTOR, section.freeze_projection, None),
                                      ("language_model", LANGUAGE, section.freeze_language_model, "language_hf")):
        setting = "hf" if section.hf is not None else own
        directory = getattr(section, setting) if setting else None
        if directory is not None:
            parts.append(HFSource(part, prefix, f"model.{setting}", directory, frozen))
    return parts


def synthetic_modalities(provider: LlavaMimoProvider) -> dict[str, ModalitySpec]:
    """Generated images shaped for the tower, behind the model's image token."""
    vision = provider.vision_config
    return {IMAGES: ModalitySpec.image(provider.image_token_id, vision.tokens_per_image, size=vision.image_size,
                                       channels=vision.num_channels)}


def modality_flops(provider: LlavaMimoProvider) -> dict[str, ModalityFlops]:
    """The images' encoder is a ViT."""
    return modalities_from_provider(provider, {IMAGES: vit_flops})
