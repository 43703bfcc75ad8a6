"""Qwen2.5-VL / Qwen3-VL `vision_config` → mimo's tower configs, strictly, and back."""

from __future__ import annotations

import re

import pytest
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

from mimo.hf.config import HFConfigError
from mimo.hf.qwen_vision_config import qwen3_vision_config, qwen25_vision_config, qwen_vision_to_hf
from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen25VisionConfig

# vision_config as the hub's Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct directories write it
HUB_QWEN25_7B = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                 "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                 "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                 "tokens_per_second": 2, "temporal_patch_size": 2}
HUB_QWEN3_8B = {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
                "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096,
                "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}


def test_the_hub_configs_map_to_the_presets():
    assert qwen25_vision_config(HUB_QWEN25_7B) == Qwen25VisionConfig.qwen25_vl_7b()
    assert qwen3_vision_config(HUB_QWEN3_8B) == Qwen3VisionConfig.qwen3_vl_8b()


@pytest.mark.parametrize("config, hf_class, read", [
    (Qwen25VisionConfig.tiny(), Qwen2_5_VLVisionConfig, qwen25_vision_config),
    (Qwen3VisionConfig.tiny(), Qwen3VLVisionConfig, qwen3_vision_config),
])
def test_export_is_what_transformers_reads_and_writes_back(config, hf_class, read):
    """mimo → HF dict → transformers' config class → its to_dict (every key transformers 5 writes) → mimo."""
    written = hf_class(**qwen_vision_to_hf(config)).to_dict()
    assert read(written) == config


@pytest.mark.parametrize("change, message", [
    ({"use_fancy_norm": True}, "unknown key(s) use_fancy_norm=True"),
    ({"hidden_act": "swish"}, "hidden_act='swish' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters="),
    ({"spatial_patch_size": 16}, "spatial_patch_size=16 differs from patch_size=14"),
    ({"in_channels": 4}, "in_chans=3 disagrees with in_channels=4"),
    ({"fullatt_block_indexes": [7, 40]}, "fullatt_block_indexes [40] are outside the 32 layers"),
    ({"model_type": "qwen3_vl"}, "model_type='qwen3_vl' is not a qwen2_5_vl vision tower"),
])
def test_a_config_mimo_cannot_reproduce_is_refused_naming_key_and_value(change, message):
    with pytest.raises(HFConfigError, match=re.escape(message)):
        qwen25_vision_config({**HUB_QWEN25_7B, **change})
