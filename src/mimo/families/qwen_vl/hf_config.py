"""Qwen2.5-VL's and Qwen3-VL's `config.json` as mimo's configs, strictly: each key read, required to hold an
implemented value, or known to be neutral (the shared `Keys` rules); transformers 5's nested `text_config` and the
hub's transformers-4 files (the language model's keys at the top level) both read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from mimo.hf.config import HFConfigError, Keys, language_config
from mimo.hf.qwen_vision_config import qwen3_vision_config, qwen25_vision_config
from mimo.models.decoder import DecoderConfig
from mimo.models.qwen_vision import Qwen3VisionConfig, QwenVisionConfig

# model_type -> (its language model's model_type, its vision_config mapping)
KINDS: dict[str, tuple[str, Callable[..., QwenVisionConfig]]] = {
    "qwen2_5_vl": ("qwen2_5_vl_text", qwen25_vision_config),
    "qwen3_vl": ("qwen3_vl_text", qwen3_vision_config),
}
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
LEGACY_TOKEN_KEYS = ("vision_token_id",)  # written by the hub's files, read by nothing in transformers


@dataclass(frozen=True)
class QwenVLSpec:
    """A Qwen-VL model as mimo builds it: the tower, the language model (with its M-RoPE layout and DeepStack
    layers) and the special token ids."""

    kind: str
    vision: QwenVisionConfig
    language: DecoderConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def qwen_vl_spec(hf: Mapping[str, Any], where: str = "config.json") -> QwenVLSpec:
    """A `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration` config as a `QwenVLSpec`."""
    kind = hf.get("model_type")
    if kind not in KINDS:
        raise HFConfigError(f"{where}: model_type={kind!r} is not a Qwen-VL model mimo implements; it implements "
                            f"{list(KINDS)}")
    text_type, vision_of = KINDS[kind]
    keys = Keys(hf, where)
    ids = {k: keys.need(k) for k in TOKEN_KEYS}
    for k in LEGACY_TOKEN_KEYS:
        keys.get(k)
    vision = vision_of(keys.need("vision_config"), f"{where}: vision_config")
    language = language_config(_text_config(keys, text_type), f"{where}: text_config")
    keys.done()
    if isinstance(vision, Qwen3VisionConfig):  # the k-th DeepStack feature goes after decoder layer k
        language = replace(language, deepstack_layers=tuple(range(len(vision.deepstack_visual_indexes))))
    if vision.out_hidden_size != language.hidden_size:
        raise HFConfigError(f"{where}: vision_config.out_hidden_size={vision.out_hidden_size} differs from the "
                            f"language model's hidden_size={language.hidden_size}")
    return QwenVLSpec(kind, vision, language, **ids)


def _text_config(keys: Keys, text_type: str) -> dict[str, Any]:
    """The language model's keys: `text_config` (transformers 5), else the top level's (the hub's 4.x files), with
    the top-level `tie_word_embeddings` (where transformers 5 keeps it) and the text model_type."""
    nested = keys.get("text_config")
    tie = keys.get("tie_word_embeddings")
    if nested is None:
        text = {k: v for k, v in keys.data.items() if k not in {"vision_config", "model_type", *TOKEN_KEYS,
                                                                   *LEGACY_TOKEN_KEYS}}
        keys.seen.update(text)
    else:
        text = dict(nested)
    if tie is not None:
        text["tie_word_embeddings"] = tie
    return {**text, "model_type": text_type}
