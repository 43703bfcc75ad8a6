"""Qwen2.5-VL and Qwen3-VL: a native-resolution vision tower (packed images of any size, its patch merger) feeding
a Qwen2 / Qwen3 decoder with M-RoPE positions (and Qwen3-VL's DeepStack). Loading and the one-process model so
far; training, data, export and generation are issue 31's next steps, so the family is not yet in the registry."""

from mimo.families.qwen_vl.hf_config import QwenVLSpec, qwen_vl_spec
from mimo.families.qwen_vl.hf_load import IMAGES, QwenVLDirectory, open_qwen_vl
from mimo.families.qwen_vl.provider import QwenVLMimoProvider

__all__ = ["IMAGES", "QwenVLDirectory", "QwenVLMimoProvider", "QwenVLSpec", "open_qwen_vl", "qwen_vl_spec"]
