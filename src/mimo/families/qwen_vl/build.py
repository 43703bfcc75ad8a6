"""From a Qwen-VL `model` section to a provider: its directory read once, or a preset's shapes; what it reads from
Hugging Face, its synthetic images (packed, of several sizes) and its FLOP count."""

from __future__ import annotations

from mimo.config import RunConfigError
from mimo.data.synthetic import ModalitySpec
from mimo.families.family import BuildSettings, HFSource
from mimo.families.qwen_vl.hf_load import IMAGES, LANGUAGE, VISION, QwenVLDirectory, open_qwen_vl
from mimo.families.qwen_vl.hf_presets import qwen_vl_preset
from mimo.families.qwen_vl.provider import QwenVLMimoProvider
from mimo.families.qwen_vl.section import QwenVLSection
from mimo.flops import ModalityFlops, qwen_vision_flops
from mimo.hf.config import HFConfigError
from mimo.hf.load import HFLoadError


def open_model(section: QwenVLSection) -> QwenVLDirectory | None:
    """The directory the section names (config mapped strictly, weights indexed), or None for a preset; a bad
    directory is one line naming it."""
    if section.hf is None:
        return None
    try:
        return open_qwen_vl(section.hf)
    except (HFConfigError, HFLoadError) as e:
        raise RunConfigError(f"model: {e}") from None


def build_provider(section: QwenVLSection, opened: QwenVLDirectory | None,
                   settings: BuildSettings) -> QwenVLMimoProvider:
    """The provider of the directory's model (each rank reading its shards of the weights), else the preset's."""
    spec = opened.spec if opened is not None else qwen_vl_preset(section.preset)
    return QwenVLMimoProvider(spec, settings.layout, freeze_language_model=section.freeze_language_model,
                              freeze_vision_encoder=section.freeze_vision_encoder, params_dtype=settings.params_dtype,
                              seed=settings.seed, device=settings.device,
                              initial_weights=None if opened is None else opened.weights())


def hf_sources(section: QwenVLSection) -> list[HFSource]:
    """Both parts come from `hf` (the merger is the tower's): a checkpoint may leave out what is frozen."""
    if section.hf is None:
        return []
    return [HFSource("vision_encoder", VISION, "model.hf", section.hf, section.freeze_vision_encoder),
            HFSource("language_model", LANGUAGE, "model.hf", section.hf, section.freeze_language_model)]


def synthetic_modalities(provider: QwenVLMimoProvider) -> dict[str, ModalitySpec]:
    """Generated images of four sizes (1, 1.5 and 3 merges a side, one non-square), packed, behind the image
    token: rows of the tower's patch width."""
    vision = provider.vision_config
    m = vision.spatial_merge_size
    grids = [(1, 2 * m, 2 * m), (1, 2 * m, 3 * m), (1, m, m), (1, 3 * m, 2 * m)]
    return {IMAGES: ModalitySpec.packed(provider.spec.image_token_id, vision.patch_dim, grids, vision.merge_unit)}


def modality_flops(provider: QwenVLMimoProvider) -> dict[str, ModalityFlops]:
    """The images' encoder is a packed tower, counted per image grid; its merger is the projection."""
    return {IMAGES: ModalityFlops(provider.vision_config, _tower_flops, freeze_encoder=provider.freeze_modality_encoders
                                  .get(IMAGES, False), has_projector=False)}


def _tower_flops(config, grid_thw, *, trainable: bool) -> int:  # noqa: ANN001 - the EncoderFormula shape
    """`qwen_vision_flops` in total, for `ModalityFlops` (items: the batch's grids)."""
    return qwen_vision_flops(config, grid_thw.tolist(), trainable=trainable).total
