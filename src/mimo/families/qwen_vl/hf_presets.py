"""Qwen-VL presets as the `config.json` they stand for, read through the same strict mapping as a directory's:
the public 7B/8B models' shapes (as their hub files say), and two tiny ones that train on a CPU in seconds."""

from __future__ import annotations

from typing import Any

from mimo.families.qwen_vl.hf_config import QwenVLSpec, qwen_vl_spec

QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}
TINY_IDS = {"image_token_id": 256, "video_token_id": 257, "vision_start_token_id": 258, "vision_end_token_id": 259}
TINY_TEXT = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}

PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {  # Qwen/Qwen2.5-VL-7B-Instruct
        "model_type": "qwen2_5_vl", **QWEN_IDS, "tie_word_embeddings": False,
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                          "out_hidden_size": 3584, "patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
    },
    "qwen3-vl-8b": {  # Qwen/Qwen3-VL-8B-Instruct
        "model_type": "qwen3_vl", **QWEN_IDS, "tie_word_embeddings": False,
        "text_config": {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "intermediate_size": 12288, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                            "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
        "vision_config": {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                          "out_hidden_size": 4096, "patch_size": 16, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"},
    },
    "tiny-qwen2.5-vl": {
        "model_type": "qwen2_5_vl", **TINY_IDS,
        "text_config": {**TINY_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [4, 2, 2]}},
        "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48,
                          "out_hidden_size": 64, "patch_size": 2, "window_size": 12, "fullatt_block_indexes": [1]},
    },
    "tiny-qwen3-vl": {
        "model_type": "qwen3_vl", **TINY_IDS, "tie_word_embeddings": True,
        "text_config": {**TINY_TEXT, "head_dim": 16,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48,
                          "out_hidden_size": 64, "patch_size": 2, "num_position_embeddings": 25,
                          "deepstack_visual_indexes": [0], "hidden_act": "gelu_pytorch_tanh"},
    },
}


def qwen_vl_preset(name: str) -> QwenVLSpec:
    """The spec of preset `name` (see `PRESET_CONFIGS`)."""
    return qwen_vl_spec(PRESET_CONFIGS[name], f"preset {name!r}")
