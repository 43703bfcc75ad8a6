"""Qwen2.5-VL and Qwen3-VL: a native-resolution vision tower (packed images of any size, its patch merger) feeding
a Qwen2 / Qwen3 decoder with M-RoPE positions (and Qwen3-VL's DeepStack)."""

from mimo.families.family import ModelFamily
from mimo.families.qwen_vl import build, data, export, serve
from mimo.families.qwen_vl.hf_config import QwenVLSpec, qwen_vl_spec
from mimo.families.qwen_vl.hf_load import IMAGES, QwenVLDirectory, open_qwen_vl
from mimo.families.qwen_vl.provider import QwenVLMimoProvider
from mimo.families.qwen_vl.section import QwenVLSection

QWEN_VL = ModelFamily(
    name="qwen_vl",
    section=QwenVLSection,
    open=build.open_model,
    provider=build.build_provider,
    hf_sources=build.hf_sources,
    synthetic_modalities=build.synthetic_modalities,
    modality_flops=build.modality_flops,
    data_names=("llava",),
    dataset=data.dataset,
    check_data=data.check_data,
    hf_model_types=("qwen2_5_vl", "qwen3_vl"),
    hf_settings=("hf",),
    export=export.export,
    generate=serve.generate,
)

__all__ = ["IMAGES", "QWEN_VL", "QwenVLDirectory", "QwenVLMimoProvider", "QwenVLSection", "QwenVLSpec",
           "open_qwen_vl", "qwen_vl_spec"]
