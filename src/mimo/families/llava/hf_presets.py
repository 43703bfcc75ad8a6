"""Known Hugging Face models as config.json contents: presets with their exact shapes and no weights.

A preset here is what the model's own directory says, read by the same strict mapping as a downloaded
directory (`mimo.hf.config.llava_config`), so "the shapes of LLaVA-1.5-7B" are the ones its config.json gives.
"""

from __future__ import annotations

from typing import Any

from mimo.families.llava.hf_config import LlavaSpec, llava_config

# llava-hf/llava-1.5-7b-hf's config.json (transformers 4 wrote its nested configs as differences from the
# Llama / CLIP defaults): CLIP ViT-L/14 at 336 px read at layer -2 (576 tokens), Vicuna-7B with the <image>
# token and a pad token added (vocabulary 32064).
LLAVA_1_5_7B: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}

HF_PRESETS: dict[str, dict[str, Any]] = {"llava-1.5-7b": LLAVA_1_5_7B}


def hf_preset(name: str) -> LlavaSpec:
    """The shapes of a known Hugging Face model, by preset name."""
    return llava_config(HF_PRESETS[name], f"preset {name!r}")
