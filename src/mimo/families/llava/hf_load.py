"""LLaVA's Hugging Face weights: the name map between mimo's names and a LLaVA (or a tower's and a language
model's) directory's, and `HFModel`, what a model section's directories describe (configs and weight rules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimo.families.llava.hf_config import LlavaSpec, llava_config, pair_config
from mimo.families.llava.provider import IMAGES
from mimo.hf.config import read_config
from mimo.hf.load import HFLoadError, HFWeights, NameRule, SafetensorsDir
from mimo.models.decoder import DecoderConfig

VISION = f"modality_submodules.{IMAGES}.encoder."
PROJECTOR = f"modality_submodules.{IMAGES}.projection."
LANGUAGE = "language_model."


# mimo prefix -> a LLaVA file's prefixes: first the names `save_pretrained` writes (transformers 5, and what
# export writes), then the older `vision_model.` nesting of llava-hf checkpoints and the in-memory `model.` names.
LLAVA_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (VISION, ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.")),
    (PROJECTOR + "fc1.", ("multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_1.")),
    (PROJECTOR + "fc2.", ("multi_modal_projector.linear_2.", "model.multi_modal_projector.linear_2.")),
    (LANGUAGE + "lm_head.", ("language_model.lm_head.", "lm_head.")),
    (LANGUAGE, ("language_model.model.", "model.language_model.")),
)
# A vision tower's own directory (CLIPVisionModel / SiglipVisionModel; a whole CLIP model nests it).
VISION_NAMES = ("", "vision_model.", "vision_tower.")


def llava_rules(checkpoint: SafetensorsDir) -> list[NameRule]:
    """A `LlavaForConditionalGeneration` directory, under any of `LLAVA_NAMES`' spellings."""
    return [NameRule(prefix, checkpoint, hf) for prefix, hf in LLAVA_NAMES]


def to_llava_name(name: str) -> str:
    """The name `save_pretrained` gives mimo parameter `name` in a LLaVA directory."""
    for prefix, hf in LLAVA_NAMES:
        if name.startswith(prefix):
            return hf[0] + name[len(prefix):]
    raise HFLoadError(f"{name} has no place in a LLaVA checkpoint")


def canonical_llava_name(file_name: str) -> str:
    """A LLaVA file's tensor name in `save_pretrained`'s current spelling (longest known prefix rewritten)."""
    matches = [(len(p), hf[0] + file_name[len(p):]) for _, hf in LLAVA_NAMES for p in hf if file_name.startswith(p)]
    return max(matches)[1] if matches else file_name


def pair_rules(vision: SafetensorsDir, language: SafetensorsDir) -> list[NameRule]:
    """A vision tower's directory (`CLIPVisionModel`, `SiglipVisionModel`, or a whole CLIP/SigLIP model) and
    a causal language model's (`LlamaForCausalLM`, ...); the projector is not in either."""
    return [
        NameRule(VISION, vision, VISION_NAMES),
        NameRule(LANGUAGE + "lm_head.", language, ("lm_head.",)),
        NameRule(LANGUAGE, language, ("model.",)),
    ]


@dataclass(frozen=True)
class HFModel:
    """A model described by Hugging Face directories: mimo's configs and where each weight comes from."""

    spec: LlavaSpec
    rules: tuple[NameRule, ...]

    def weights(self, padded: bool = False) -> HFWeights:
        """A fresh source (with its own read log) for one model build; `padded`: the language model's vocabulary is
        padded (its embedding and head get zero rows past the file's)."""
        rows = frozenset({LANGUAGE + "embed_tokens.weight", LANGUAGE + "lm_head.weight"} if padded else ())
        return HFWeights(self.rules, padded_rows=rows)

    def provider_kwargs(self, language: DecoderConfig | None = None) -> dict[str, Any]:
        """The `LlavaMimoProvider` arguments that build this model and fill it from the directories; `language`:
        the language model's config as built (its vocabulary padded), default the directory's."""
        s, language = self.spec, language or self.spec.language
        return {"vision_config": s.vision, "language_config": language, "image_token_id": s.image_token_id,
                "projector_activation": s.projector_activation, "projector_bias": s.projector_bias,
                "initial_weights": self.weights(padded=language.padded_vocab_size is not None)}


def open_llava(directory: str | Path) -> HFModel:
    """A whole `LlavaForConditionalGeneration` directory."""
    return HFModel(llava_config(read_config(directory), f"{directory}/config.json"),
                   tuple(llava_rules(SafetensorsDir(directory))))


def open_pair(vision_dir: str | Path, language_dir: str | Path, image_token_id: int | None = None,
              feature_layer: int = -2, strategy: str = "default", projector_activation: str = "gelu") -> HFModel:
    """A vision tower directory and a language model directory; the projector starts fresh (seeded)."""
    spec = pair_config(read_config(vision_dir), read_config(language_dir), image_token_id, feature_layer,
                       strategy, projector_activation)
    return HFModel(spec, tuple(pair_rules(SafetensorsDir(vision_dir), SafetensorsDir(language_dir))))


