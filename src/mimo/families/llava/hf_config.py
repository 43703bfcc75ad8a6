"""LLaVA's `config.json` ↔ mimo: a `LlavaForConditionalGeneration` config (or a tower and a language model's)
into a `LlavaSpec`, strictly (an unknown key or unimplemented value is an `HFConfigError`), and back for export."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mimo.hf.config import HFConfigError, Keys, language_config, language_to_hf, vision_config, vision_to_hf
from mimo.models.decoder import DecoderConfig
from mimo.models.encoder_block import ACTIVATIONS
from mimo.models.vit import ViTConfig


@dataclass(frozen=True)
class LlavaSpec:
    """What a LLaVA directory (or a vision tower + language model pair) maps to in mimo."""

    vision: ViTConfig
    language: DecoderConfig
    image_token_id: int
    projector_activation: str = "gelu"
    projector_bias: bool = True


def llava_config(hf: Mapping[str, Any], where: str = "config.json") -> LlavaSpec:
    """A `LlavaForConditionalGeneration` config: the tower, the language model, the projector, the image id."""
    if hf.get("model_type") != "llava":
        raise HFConfigError(f"{where}: model_type={hf.get('model_type')!r}; a whole-model directory must be "
                            f"'llava' (LlavaForConditionalGeneration); give vision_hf and language_hf for a "
                            f"tower plus a language model")
    keys = Keys(hf, where)
    keys.get("image_seq_length")  # the processor's token count; the model's comes from the tower's shape
    layer = keys.get("vision_feature_layer", -2)
    strategy = keys.get("vision_feature_select_strategy", "default")
    vision = vision_config(keys.get("vision_config", {}), layer, strategy)
    text = {"model_type": "llama", **keys.get("text_config", {})}
    top_tie = keys.get("tie_word_embeddings")
    if top_tie is not None and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = top_tie
    language = language_config(text)
    vocab = keys.get("vocab_size")  # transformers 4's echo of the text vocabulary
    if vocab is not None and vocab != language.vocab_size:
        raise HFConfigError(f"{where}: vocab_size={vocab} differs from text_config's {language.vocab_size}")
    activation = keys.require("projector_hidden_act", lambda v: v in ACTIVATIONS, "gelu",
                              f"projector_hidden_act in {sorted(ACTIVATIONS)}")
    bias = keys.get("multimodal_projector_bias", True)
    image_token = keys.get("image_token_index", keys.get("image_token_id"))
    if image_token is None:
        raise HFConfigError(f"{where}: missing 'image_token_index'")
    keys.done()
    return LlavaSpec(vision, language, int(image_token), activation, bool(bias))


def pair_config(vision_hf: Mapping[str, Any], language_hf: Mapping[str, Any], image_token_id: int | None = None,
                feature_layer: int = -2, strategy: str = "default", projector_activation: str = "gelu") -> LlavaSpec:
    """A tower and a language model from separate directories, with a fresh projector between them; the image
    token defaults to the first id past the vocabulary (as mimo's presets)."""
    vision = vision_config(vision_hf, feature_layer, strategy, "vision_hf config.json")
    language = language_config(language_hf, "language_hf config.json")
    if projector_activation not in ACTIVATIONS:
        raise HFConfigError(f"projector_hidden_act={projector_activation!r} is not supported by mimo; it "
                            f"implements {sorted(ACTIVATIONS)}")
    token = language.vocab_size if image_token_id is None else image_token_id
    return LlavaSpec(vision, language, token, projector_activation, True)



def llava_to_hf(spec: LlavaSpec, vision_layers: int, feature_layer: int, vocab_size: int) -> dict[str, Any]:
    """A `LlavaForConditionalGeneration` config.json for `spec`, its tower written with `vision_layers` layers
    read at `feature_layer`, its vocabulary `vocab_size` (the image id must be inside it)."""
    vision = spec.vision
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision_to_hf(vision, vision_layers),
        "text_config": language_to_hf(spec.language, vocab_size),
        "image_token_index": spec.image_token_id, "image_seq_length": vision.tokens_per_image,
        "projector_hidden_act": spec.projector_activation, "multimodal_projector_bias": spec.projector_bias,
        "vision_feature_layer": feature_layer,
        "vision_feature_select_strategy": "default" if vision.drop_class_token else "full",
        "tie_word_embeddings": spec.language.tie_embeddings,
    }
