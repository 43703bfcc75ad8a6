"""mimo's own reference modules as a family: any of images (ViT) and audio, seeded, on synthetic data. It has
no Hugging Face form (no export, no generate); it is how the audio encoder reaches `mimo train`."""

from mimo.families.builtin import build
from mimo.families.builtin.section import BuiltinSection
from mimo.families.family import ModelFamily

BUILTIN = ModelFamily(
    name="builtin",
    section=BuiltinSection,
    open=build.open_model,
    provider=build.build_provider,
    hf_sources=build.hf_sources,
    synthetic_modalities=build.synthetic_modalities,
    modality_flops=build.modality_flops,
)

__all__ = ["BUILTIN", "BuiltinSection"]
