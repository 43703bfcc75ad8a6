"""Hugging Face `config.json` → mimo's `ViTConfig` / `DecoderConfig`, strictly.

The parts families share: CLIP and SigLIP vision towers, Llama / Vicuna / Mistral and Qwen2 language models (a
whole model's config, e.g. LLaVA's, is its family's: `mimo.families.<family>`). Each key of a config is either
read into mimo's config, required to have a value mimo implements, or known not to change the numbers (token ids,
initializer ranges, generation defaults); any other key, and any unimplemented value, is an `HFConfigError`
naming the key and its value: a model mimo cannot reproduce is refused, never loaded to different numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mimo.models.decoder import DecoderConfig
from mimo.models.encoder_block import ACTIVATIONS
from mimo.models.rotary import Llama3RopeScaling, MRopeLayout
from mimo.models.vit import ViTConfig

# Keys that never change a forward pass: bookkeeping, token ids, initialization, generation defaults.
NEUTRAL_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "model_type", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "id2label", "label2id", "problem_type", "initializer_range", "initializer_factor", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "tf_legacy_loss", "pruned_heads", "torchscript",
    "use_bfloat16", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "_attn_implementation_autoset",
    "ignore_index",  # the label value the loss skips (LLaVA's -100, which is mimo's too); no effect on logits
})
# transformers 4 writes a nested config as its difference from the family's defaults (llava-1.5-7b-hf's
# text_config omits hidden_size, ...), so each family's defaults fill what a config leaves out.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "rms_norm_eps": 1e-6, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6},
    "qwen2_5_vl_text": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0},
    "qwen3_vl_text": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
                      "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 500000.0},
    "clip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16},
}
TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "qwen3_vl_text")
QWEN2_LIKE = ("qwen2", "qwen2_5_vl_text")  # q/k/v biased, no output bias; optional sliding layers refused
# each Qwen-VL text model's M-RoPE: transformers' default mrope_section and whether it interleaves the axes
MROPE = {"qwen2_5_vl_text": ((16, 24, 24), False), "qwen3_vl_text": ((24, 20, 20), True)}
VISION_FAMILIES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")
SELECT_STRATEGIES = ("default", "full")


class HFConfigError(ValueError):
    """A Hugging Face config mimo cannot reproduce exactly; the message names the key and its value."""


def read_config(directory: str | Path) -> dict[str, Any]:
    """The `config.json` of a local Hugging Face directory, with a clear error if there is none."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise HFConfigError(f"{directory}: no such directory; give a local Hugging Face model directory (what "
                            f"save_pretrained writes: mimo downloads nothing)")
    if not path.is_file():
        raise HFConfigError(f"{directory}: no config.json; expected a local Hugging Face model directory "
                            f"(what save_pretrained writes)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}: not valid JSON ({e})") from None


class Keys:
    """One config dict read strictly: every key must be read, required or neutral by the time `done` runs."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where, self.seen = dict(data), where, set(NEUTRAL_KEYS)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key` (or `default`), marking it handled."""
        self.seen.add(key)
        return self.data.get(key, default)

    def need(self, key: str) -> Any:
        """The value of a key mimo cannot do without."""
        if key not in self.data:
            raise HFConfigError(f"{self.where}: missing {key!r}")
        return self.get(key)

    def require(self, key: str, allowed: Callable[[Any], bool], default: Any, what: str) -> Any:
        """A key whose value must satisfy `allowed` (absent: `default`); `what` says what mimo implements."""
        value = self.get(key, default)
        if not allowed(value):
            raise HFConfigError(f"{self.where}: {key}={value!r} is not supported by mimo; it implements {what}")
        return value

    def fail(self, key: str, what: str) -> None:
        """Refuse `key`'s value, saying what mimo implements instead."""
        raise HFConfigError(f"{self.where}: {key}={self.data.get(key)!r} is not supported by mimo; it implements "
                            f"{what}")

    def done(self) -> None:
        """Refuse any key nobody read: mimo does not know what it would change."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            shown = ", ".join(f"{k}={self.data[k]!r}" for k in unknown[:3])
            raise HFConfigError(f"{self.where}: unknown key(s) {shown}{' ...' if len(unknown) > 3 else ''}; mimo "
                                f"does not implement them, so it refuses rather than load different numbers")


def _zero(value: Any) -> bool:
    return value in (0, 0.0, None)


# -- vision towers -------------------------------------------------------------------------------------------
def vision_config(hf: Mapping[str, Any], feature_layer: int = -2, strategy: str = "default",
                  where: str = "vision_config") -> ViTConfig:
    """A CLIP or SigLIP vision config (or a full CLIP/SigLIP model's `vision_config`) as a `ViTConfig` whose
    output is hidden state `feature_layer`, the first token dropped under strategy "default" (as LLaVA does)."""
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type in ("clip", "siglip"):
        if "vision_config" not in hf:
            raise HFConfigError(f"{where}: a {model_type} config without vision_config")
        return vision_config(hf["vision_config"], feature_layer, strategy, f"{where}.vision_config")
    if model_type not in VISION_FAMILIES:
        raise HFConfigError(f"{where}: model_type={model_type!r} is not a vision tower mimo implements; it "
                            f"implements {list(VISION_FAMILIES)}")
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise HFConfigError(f"vision_feature_layer={feature_layer!r} is not supported by mimo; it implements one "
                            f"layer index (an int, negative counts from the last)")
    if strategy not in SELECT_STRATEGIES:
        raise HFConfigError(f"vision_feature_select_strategy={strategy!r} is not supported by mimo; it "
                            f"implements {list(SELECT_STRATEGIES)}")
    keys = Keys({**FAMILY_DEFAULTS[model_type], **hf}, where)
    keys.get("vocab_size")  # llava-hf towers carry an unused vocab_size
    siglip = model_type == "siglip_vision_model"
    activation = keys.require("hidden_act", lambda v: v in ACTIVATIONS, "gelu_pytorch_tanh" if siglip else
                              "quick_gelu", f"hidden_act in {sorted(ACTIVATIONS)}")
    keys.require("attention_dropout", _zero, 0.0, "no dropout (attention_dropout 0)")
    keys.get("projection_dim")  # CLIP's image projection head: LLaVA reads hidden states, not it
    if siglip:
        keys.get("vision_use_head")  # SigLIP's pooling head: not on LLaVA's path, not built
    fields = dict(
        image_size=keys.need("image_size"), patch_size=keys.need("patch_size"),
        num_channels=keys.get("num_channels", 3), hidden_size=keys.need("hidden_size"),
        num_layers=keys.need("num_hidden_layers"), num_heads=keys.need("num_attention_heads"),
        ffn_hidden_size=keys.need("intermediate_size"),
        layer_norm_eps=keys.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
        select_layer=feature_layer, drop_class_token=strategy == "default", activation=activation,
    )
    keys.done()
    try:
        return ViTConfig.siglip(**fields) if siglip else ViTConfig(**fields)
    except ValueError as e:
        raise HFConfigError(f"{where}: {e}") from None


# -- language models -----------------------------------------------------------------------------------------
def language_config(hf: Mapping[str, Any], where: str = "text_config") -> DecoderConfig:
    """A Llama / Vicuna / Mistral or Qwen2 config as a `DecoderConfig`."""
    family = hf.get("model_type", "llama")
    if family not in TEXT_FAMILIES:
        raise HFConfigError(f"{where}: model_type={family!r} is not a language model mimo implements; it "
                            f"implements {list(TEXT_FAMILIES)}")
    keys = Keys({**FAMILY_DEFAULTS[family], **hf}, where)
    keys.require("hidden_act", lambda v: v == "silu", "silu", "hidden_act 'silu' (SwiGLU)")
    keys.require("attention_dropout", _zero, 0.0, "no dropout (attention_dropout 0)")
    keys.require("mlp_bias", lambda v: v is False, False, "bias-free MLPs (mlp_bias false)")
    keys.require("pretraining_tp", lambda v: v == 1, 1, "pretraining_tp 1")
    heads = keys.need("num_attention_heads")
    hidden = keys.need("hidden_size")
    if family == "qwen2_5_vl_text":  # transformers' Qwen2.5-VL attention always takes hidden / heads
        keys.require("head_dim", lambda v: v in (None, hidden // heads), None, f"head_dim hidden_size / "
                     f"num_attention_heads = {hidden // heads} (Qwen2.5-VL's attention takes no other)")
    head_dim = keys.get("head_dim")
    theta, scaling, mrope = _rope(keys, family)
    max_positions = keys.get("max_position_embeddings", 4096)
    bias = _attention_bias(keys, family)
    max_positions = _full_attention_span(keys, family, max_positions)
    fields = dict(
        vocab_size=keys.need("vocab_size"), hidden_size=hidden, num_layers=keys.need("num_hidden_layers"),
        num_heads=heads, num_kv_heads=keys.get("num_key_value_heads") or heads,
        ffn_hidden_size=keys.need("intermediate_size"), rms_norm_eps=keys.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), max_seq_len=max_positions,
        tie_embeddings=bool(keys.get("tie_word_embeddings", False)),
        kv_channels=head_dim if head_dim not in (None, hidden // heads) else None,
        qkv_bias=bias[0], output_bias=bias[1], rope_scaling=scaling, mrope=mrope,
        qk_norm=family == "qwen3_vl_text",
    )
    keys.done()
    try:
        return DecoderConfig(**fields)
    except ValueError as e:
        raise HFConfigError(f"{where}: {e}") from None


def _attention_bias(keys: Keys, family: str) -> tuple[bool, bool]:
    """(q/k/v bias, output bias): Qwen2 always biases q/k/v only; Llama's `attention_bias` biases all four."""
    if family in QWEN2_LIKE:
        return True, False
    bias = bool(keys.get("attention_bias", False))
    return bias, bias


def _full_attention_span(keys: Keys, family: str, max_positions: int) -> int:
    """The longest sequence mimo's full causal attention computes exactly as the model does.

    A sliding window of w tokens equals full attention on sequences of at most w tokens, so Mistral's window
    caps the sequence length (a longer sequence is refused by the decoder, not computed differently); Qwen2's
    sliding layers (use_sliding_window true) are not implemented.
    """
    if family in QWEN2_LIKE:
        keys.require("use_sliding_window", lambda v: not v, False, "full attention (use_sliding_window false)")
        keys.get("sliding_window")
        keys.get("max_window_layers")
        keys.require("layer_types", lambda v: v is None or set(v) <= {"full_attention"}, None,
                     "full attention in every layer")
        return max_positions
    keys.require("layer_types", lambda v: v is None or set(v) <= {"full_attention"}, None,
                 "full attention in every layer")
    window = keys.get("sliding_window") if family == "mistral" else None
    return min(max_positions, window) if window else max_positions


def _rope(keys: Keys, family: str) -> tuple[float, Llama3RopeScaling | None, MRopeLayout | None]:
    """rope θ, scaling and M-RoPE layout from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (4.x)."""
    params = keys.get("rope_parameters")
    if params is None:
        params = dict(keys.get("rope_scaling") or {})
        params.setdefault("rope_theta", keys.get("rope_theta", 10000.0))
    else:  # transformers 5 writes rope_parameters; older keys alongside it are its legacy echo
        keys.get("rope_theta")
        keys.get("rope_scaling")
    params = dict(params)
    mrope = _mrope(params, family, keys.where)
    if params.get("type") == "mrope":  # Qwen2.5-VL's legacy marker beside rope_type (or in its place)
        params.pop("type")
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", keys.data.get("rope_theta", 10000.0))
    where = "rope_parameters"
    if kind == "default":
        _no_extra(params, where, kind)
        return theta, None, mrope
    if mrope is not None:
        raise HFConfigError(f"{keys.where}: {where}.rope_type={kind!r} with M-RoPE is not supported by mimo; it "
                            f"implements 'default'")
    if kind != "llama3":
        raise HFConfigError(f"{keys.where}: {where}.rope_type={kind!r} is not supported by mimo; it implements "
                            f"'default' and 'llama3'")
    try:
        scaling = Llama3RopeScaling(float(params.pop("factor")), float(params.pop("low_freq_factor")),
                                    float(params.pop("high_freq_factor")),
                                    int(params.pop("original_max_position_embeddings")))
    except KeyError as e:
        raise HFConfigError(f"{keys.where}: {where} of rope_type 'llama3' lacks {e.args[0]!r}") from None
    if params.get("attention_factor", 1.0) in (None, 1.0):  # llama3 scales frequencies, not attention
        params.pop("attention_factor", None)
    _no_extra(params, where, kind)
    return theta, scaling, None


def _mrope(params: dict, family: str, where: str) -> MRopeLayout | None:
    """The M-RoPE layout of a Qwen-VL text model (its `mrope_section`, transformers' default where absent), its
    keys taken out of `params`; None for other families, which must not carry them."""
    section = params.pop("mrope_section", None)
    interleaved = params.pop("mrope_interleaved", None)
    if family not in MROPE:
        if section is not None or interleaved:
            raise HFConfigError(f"{where}: mrope_section={section!r} on a {family!r} model; mimo implements M-RoPE "
                                f"for {list(MROPE)}")
        return None
    default_section, family_interleaves = MROPE[family]
    if interleaved not in (None, family_interleaves):
        raise HFConfigError(f"{where}: rope_parameters.mrope_interleaved={interleaved!r} is not supported by mimo for "
                            f"{family!r}, which interleaves: {family_interleaves}")
    return MRopeLayout(tuple(section or default_section), family_interleaves)


def _no_extra(params: dict, where: str, kind: str) -> None:
    """Refuse rope settings the rope type does not use in mimo."""
    if params:
        key, value = next(iter(params.items()))
        raise HFConfigError(f"{where}.{key}={value!r} is not supported by mimo for rope_type {kind!r}")


# -- mimo → Hugging Face (export) ----------------------------------------------------------------------------
def vision_to_hf(vision: ViTConfig, num_layers: int) -> dict[str, Any]:
    """The `vision_config` of a tower of this shape with `num_layers` layers (CLIP, or SigLIP if classless)."""
    if vision.class_token == vision.patch_bias or vision.class_token != vision.pre_layernorm:
        raise HFConfigError(f"a tower with class_token={vision.class_token}, pre_layernorm={vision.pre_layernorm}, "
                            f"patch_bias={vision.patch_bias} is neither CLIP nor SigLIP; transformers has no class "
                            f"for it")
    out = {"model_type": "clip_vision_model" if vision.class_token else "siglip_vision_model",
           "hidden_size": vision.hidden_size, "intermediate_size": vision.ffn_hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": vision.num_heads,
           "num_channels": vision.num_channels, "image_size": vision.image_size, "patch_size": vision.patch_size,
           "hidden_act": vision.activation, "layer_norm_eps": vision.layer_norm_eps, "attention_dropout": 0.0}
    if not vision.class_token:
        out["vision_use_head"] = False
    return out


def language_to_hf(language: DecoderConfig, vocab_size: int) -> dict[str, Any]:
    """The `text_config` of a decoder of this shape: Qwen2 if only q/k/v are biased, else Llama."""
    qwen2 = language.qkv_bias and not language.output_bias
    if language.qkv_bias != language.output_bias and not qwen2:
        raise HFConfigError("a decoder with an output bias but no q/k/v biases is neither Llama nor Qwen2")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": language.rope_theta}
    if language.rope_scaling is not None:
        s = language.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": language.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    out = {"model_type": "qwen2" if qwen2 else "llama", "vocab_size": vocab_size,
           "hidden_size": language.hidden_size, "intermediate_size": language.ffn_hidden_size,
           "num_hidden_layers": language.num_layers, "num_attention_heads": language.num_heads,
           "num_key_value_heads": language.num_kv_heads, "head_dim": language.head_dim,
           "rms_norm_eps": language.rms_norm_eps, "max_position_embeddings": language.max_seq_len,
           "tie_word_embeddings": language.tie_embeddings, "hidden_act": "silu", "rope_parameters": rope,
           "attention_dropout": 0.0}
    if not qwen2:
        out.update(attention_bias=language.qkv_bias, mlp_bias=False)
    return out
