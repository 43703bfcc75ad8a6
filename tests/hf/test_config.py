"""Hugging Face configs map to mimo's exactly, or fail naming the key and value mimo does not implement."""

from __future__ import annotations

import json

import pytest

from mimo.families.llava.hf_config import llava_config, pair_config
from mimo.hf.config import HFConfigError, language_config, read_config, vision_config
from mimo.models.rotary import Llama3RopeScaling
from tests.hf import tiny_hf


def llava_dict(**kw) -> dict:
    return json.loads(tiny_hf.llava(**kw).config.to_json_string())


def test_llava_maps_every_feature():
    spec = llava_config(llava_dict(text="qwen2", text_kw={"tie_word_embeddings": True, "rms_norm_eps": 1e-5},
                                   vision_feature_layer=-3, vision_feature_select_strategy="full",
                                   projector_hidden_act="silu", multimodal_projector_bias=False))
    assert (spec.vision.select_layer, spec.vision.drop_class_token, spec.vision.tokens_per_image) == (-3, False, 17)
    lang = spec.language
    assert (lang.num_kv_heads, lang.qkv_bias, lang.output_bias, lang.tie_embeddings, lang.rms_norm_eps) == \
        (2, True, False, True, 1e-5)
    assert (spec.projector_activation, spec.projector_bias, spec.image_token_id) == ("silu", False, 299)


def test_llama3_rope_and_head_dim():
    cfg = tiny_hf.text_config("llama", head_dim=32, attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    lang = language_config(cfg.to_dict())
    assert lang.rope_theta == 5e5 and lang.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    assert (lang.head_dim, lang.qkv_bias, lang.output_bias) == (32, True, True)


def test_transformers_4_rope_keys():
    old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_theta": 1e6, "rope_scaling": None}
    assert language_config(old).rope_theta == 1e6


def test_siglip_and_mistral_window():
    vit = vision_config(tiny_hf.vision_config("siglip").to_dict(), -1, "full")
    assert (vit.class_token, vit.pre_layernorm, vit.patch_bias, vit.tokens_per_image) == (False, False, True, 16)
    lang = language_config(tiny_hf.text_config("mistral", sliding_window=128).to_dict())
    assert lang.max_seq_len == 128  # full attention equals the window up to its length; longer is refused


@pytest.mark.parametrize(("where", "change", "message"), [
    ("text", {"hidden_act": "gelu"}, r"text_config: hidden_act='gelu' is not supported by mimo"),
    ("text", {"mlp_bias": True}, r"mlp_bias=True is not supported"),
    ("text", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     r"rope_parameters\.rope_type='yarn' is not supported by mimo"),
    ("text", {"made_up_key": 3}, r"text_config: unknown key\(s\) made_up_key=3"),
    ("text", {"model_type": "gemma"}, r"model_type='gemma' is not a language model mimo implements"),
    ("vision", {"attention_dropout": 0.1}, r"vision_config: attention_dropout=0\.1 is not supported"),
    ("top", {"vision_feature_layer": [-2, -1]}, r"vision_feature_layer=\[-2, -1\] is not supported by mimo"),
    ("top", {"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy='cls' is not supported"),
    ("top", {"vision_feature_layer": -5}, r"select_layer -5 is outside"),
    ("top", {"projector_hidden_act": "mish"}, r"projector_hidden_act='mish' is not supported by mimo"),
    ("top", {"quantization_config": {"bits": 4}}, r"config\.json: unknown key\(s\) quantization_config="),
])
def test_unsupported_values_are_named(where, change, message):
    data = llava_dict()
    target = {"text": data["text_config"], "vision": data["vision_config"], "top": data}[where]
    target.update(change)
    with pytest.raises(HFConfigError, match=message):
        llava_config(data)


def test_qwen2_sliding_window_is_refused():
    cfg = tiny_hf.text_config("qwen2").to_dict()
    cfg.update(use_sliding_window=True, sliding_window=8)
    with pytest.raises(HFConfigError, match=r"use_sliding_window=True is not supported by mimo"):
        language_config(cfg)


def test_not_a_llava_directory(tmp_path):
    with pytest.raises(HFConfigError, match="no config.json"):
        read_config(tmp_path)
    with pytest.raises(HFConfigError, match=r"model_type='llama'; a whole-model directory must be 'llava'"):
        llava_config(tiny_hf.text_config("llama").to_dict())
    with pytest.raises(HFConfigError, match=r"model_type='llama' is not a vision tower"):
        pair_config(tiny_hf.text_config("llama").to_dict(), tiny_hf.text_config("llama").to_dict())


def test_llava_1_5_7b_preset_is_its_config_json():
    """llava-hf's config.json (transformers 4: nested configs as differences from the defaults) maps to
    LLaVA-1.5-7B's shapes, and the provider preset of that name has them (7.06 B parameters)."""
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.hf_presets import hf_preset

    spec = hf_preset("llava-1.5-7b")
    v, lang = spec.vision, spec.language
    assert (v.hidden_size, v.num_layers, v.num_layers_built, v.tokens_per_image, v.image_size) == \
        (1024, 24, 23, 576, 336)
    assert (lang.vocab_size, lang.hidden_size, lang.num_layers, lang.num_heads, lang.num_kv_heads) == \
        (32064, 4096, 32, 32, 32)
    assert (lang.ffn_hidden_size, lang.rms_norm_eps, lang.max_seq_len, spec.image_token_id) == \
        (11008, 1e-5, 4096, 32000)
    provider = LlavaMimoProvider.preset("llava-1.5-7b")
    assert provider.image_token_id == 32000
    assert 7.0e9 < sum(provider.num_params().values()) < 7.1e9


def test_transformers_4_configs_fill_family_defaults():
    spec = llava_config({"model_type": "llava", "text_config": {"model_type": "llama"}, "vocab_size": 32000,
                         "vision_config": {"model_type": "clip_vision_model"}, "image_token_index": 31999})
    assert (spec.language.hidden_size, spec.vision.hidden_size, spec.vision.patch_size) == (4096, 768, 32)
    with pytest.raises(HFConfigError, match="vocab_size=7 differs from text_config's 32000"):
        llava_config({"model_type": "llava", "vocab_size": 7, "image_token_index": 1})
