"""LLaVA (LLaVA-1.5's recipe): a CLIP / SigLIP tower and an MLP projector feeding a Llama-style decoder."""

from mimo.families.family import ModelFamily
from mimo.families.llava import build, data, serve
from mimo.families.llava.provider import IMAGES, LlavaMimoProvider
from mimo.families.llava.section import LlavaSection

LLAVA = ModelFamily(
    name="llava",
    section=LlavaSection,
    open=build.open_model,
    provider=build.build_provider,
    hf_sources=build.hf_sources,
    synthetic_modalities=build.synthetic_modalities,
    modality_flops=build.modality_flops,
    data_names=("digits", "llava"),
    dataset=data.dataset,
    check_data=data.check_data,
    hf_model_types=("llava",),
    hf_settings=("hf", "vision_hf", "language_hf"),
    export=serve.export,
    generate=serve.generate,
    questions=serve.questions,
)

__all__ = ["IMAGES", "LLAVA", "LlavaMimoProvider", "LlavaSection"]
