"""A whole mimo LLaVA model → a directory `LlavaForConditionalGeneration.from_pretrained` loads.

Parameters are written under the names `save_pretrained` writes (`hf_load.LLAVA_NAMES`), in safetensors (sharded
with an index above `max_shard_bytes`). What mimo does not hold comes from where the model came from:
a LLaVA directory gives its config.json and the tensors LLaVA never reads (the tower's layers past the
selected one, its post-LayerNorm, SigLIP's pooling head), so HF → mimo → HF is bit-exact; a tower directory
gives its unread layers the same way. A model with no Hugging Face origin (a preset) is written with its tower
cut at the selected layer (read as layer -1) and an identity post-LayerNorm, which computes the same.
Tokenizer, processor and chat-template files are carried over from the run's tokenizer directory (`Served.tokenizer`:
what the model was trained with, a preset's included) and the origin directories. A model not loaded from a whole
LLaVA (a preset, or LLaVA-1.5's tower + language model recipe) gets what LLaVA's own conversion adds: the image
token in the tokenizer at the model's image id (or, where the run's tokenizer has its own image token inside the
vocabulary, as the digits' does, that id as the config's image id: it never reached the model as text), the
run's image preprocessing as a `preprocessor_config.json` (`Served.images`), a `processor_config.json` and
`chat_template.jinja`, and the tokenizer's BOS / EOS / pad ids in the config and `generation_config.json`, so
`LlavaProcessor` loads the directory and `generate` stops where `mimo generate` stops.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimo.families.llava.hf_config import LlavaSpec, llava_to_hf
from mimo.families.llava.hf_load import VISION_NAMES, canonical_llava_name, to_llava_name
from mimo.hf.carry import TOKENIZER_FILES, carry_files, dtype_name
from mimo.hf.config import read_config
from mimo.hf.image import ImageProcessor
from mimo.hf.load import SafetensorsDir
from mimo.hf.prompt import IMAGE_TOKEN, Prompter
from mimo.hf.shards import check_new_directory, write_safetensors

EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


@dataclass(frozen=True)
class Origin:
    """The Hugging Face directories a model was loaded from: a whole LLaVA, or a tower and a language model."""

    llava: Path | None = None
    vision: Path | None = None
    language: Path | None = None


@dataclass(frozen=True)
class Served:
    """What the run trained the model with besides its weights: the tokenizer directory and the image
    preprocessing (None where the run had none: a preset trained on synthetic data)."""

    tokenizer: Path | None = None
    images: ImageProcessor | None = None


def export_llava(model: nn.Module, spec: LlavaSpec, out_dir: str | Path, origin: Origin = Origin(),
                 max_shard_bytes: int = 5 * 2**30, served: Served = Served()) -> Path:
    """Write `model` (a whole, unwrapped MimoModel of `spec`) as a Hugging Face LLaVA directory."""
    out = Path(out_dir)
    check_new_directory(out)
    if origin.llava is None:
        spec = dataclasses.replace(spec, image_token_id=_image_id(spec, served.tokenizer or origin.language))
    tensors = {to_llava_name(n): p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    for name in (EMBED, HEAD):  # a vocabulary padded for tensor parallelism: the real rows only
        if name in tensors:
            tensors[name] = tensors[name][:spec.language.vocab_size].contiguous()
    dtype = next(iter(tensors.values())).dtype
    if origin.llava is not None:
        config = read_config(origin.llava)
        _add_unheld(tensors, SafetensorsDir(origin.llava), canonical_llava_name, spec.language.tie_embeddings, dtype)
    else:
        if origin.vision is not None:
            tower = SafetensorsDir(origin.vision)
            _add_unheld(tensors, tower, _tower_renamer(tower), False, dtype)
            layers, feature_layer = spec.vision.num_layers, spec.vision.select_layer
        else:
            _identity_post_layernorm(tensors, spec.vision.hidden_size, dtype)
            layers, feature_layer = spec.vision.num_layers_built, -1
        vocab = _pad_vocabulary(tensors, spec)
        config = llava_to_hf(spec, layers, feature_layer, vocab)
    config["dtype"] = dtype_name(dtype)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(((name, tensors[name]) for name in sorted(tensors)), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    carry_files(served.tokenizer, out, TOKENIZER_FILES)
    for directory in (origin.llava, origin.language, origin.vision):
        carry_files(directory, out)
    if origin.llava is None:
        _add_image_token(out, spec.image_token_id)
        _write_preprocessor_config(out, served.images)
        _write_processor_config(out, spec)
        _write_chat_template(out)
        _write_special_ids(out)
    return out


def _image_id(spec: LlavaSpec, tokenizer: Path | None) -> int:
    """The image id to write: the tokenizer's own image token where it has one inside the vocabulary that is not
    the model's (mimo's data maps it to the model's id, so the model never saw it as text), else the model's."""
    if tokenizer is None or not (Path(tokenizer) / "tokenizer.json").is_file():
        return spec.image_token_id
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json")).token_to_id(IMAGE_TOKEN)
    return own if own is not None and own < spec.language.vocab_size else spec.image_token_id


def _add_unheld(tensors: dict[str, torch.Tensor], source: SafetensorsDir, rename, tied: bool,
                dtype: torch.dtype) -> None:
    """Copy every tensor of `source` the model does not hold, in the model's dtype (a tied head is the
    embedding, not copied)."""
    for name in source.names():
        target = rename(name)
        if target is None or target in tensors or (tied and target == HEAD):
            continue
        tensors[target] = source.slice(name)[:].to(dtype)


def _tower_renamer(source: SafetensorsDir):
    """Names of a tower directory → the LLaVA tower's names (None for what is not the tower: CLIP's text)."""
    prefix = next((p for p in VISION_NAMES[::-1] if f"{p}embeddings.patch_embedding.weight" in source), "")

    def rename(name: str) -> str | None:
        return "vision_tower." + name[len(prefix):] if name.startswith(prefix) else None
    return rename


def _identity_post_layernorm(tensors: dict[str, torch.Tensor], hidden: int, dtype: torch.dtype) -> None:
    """The tower's post-LayerNorm, which LLaVA's hidden-state features never pass through: identity."""
    tensors["vision_tower.post_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors["vision_tower.post_layernorm.bias"] = torch.zeros(hidden, dtype=dtype)


def _pad_vocabulary(tensors: dict[str, torch.Tensor], spec: LlavaSpec) -> int:
    """The vocabulary size to write: transformers' LLaVA embeds the image id, so an id past mimo's vocabulary
    (mimo's default) gets zero rows up to it; they are never read as inputs (image positions are overwritten)
    and score 0 as outputs."""
    vocab = spec.language.vocab_size
    if spec.image_token_id < vocab:
        return vocab
    size = spec.image_token_id + 1
    for name in (EMBED, HEAD):
        if name in tensors:
            weight = tensors[name]
            tensors[name] = torch.cat([weight, weight.new_zeros(size - vocab, weight.shape[1])])
    return size


def _add_image_token(out: Path, image_token_id: int, token: str = IMAGE_TOKEN) -> None:
    """Give the carried tokenizer.json `token` at the model's image id, as a special added token (a language
    model's tokenizer has none; mimo's training data added it too). `tokenizers` numbers an added token itself,
    so this works when the image id is the tokenizer's next id (LLaVA-1.5: Vicuna's 32000); otherwise a warning
    says that transformers' processor will not place images."""
    path = out / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(token) is None and tokenizer.get_vocab_size(with_added_tokens=True) == image_token_id:
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        tokenizer.save(str(path))
    if tokenizer.token_to_id(token) != image_token_id:
        warnings.warn(f"{path}: {token} is token {tokenizer.token_to_id(token)}, not the model's image token "
                      f"{image_token_id}; transformers' LlavaProcessor will not place images with this tokenizer",
                      stacklevel=2)


def _write_processor_config(out: Path, spec: LlavaSpec) -> None:
    """A `LlavaProcessor`'s processor_config.json (patch size, feature strategy, class token) beside a carried
    tokenizer and image processor, unless one was carried."""
    if (out / "processor_config.json").exists() or not all(
            (out / name).is_file() for name in ("tokenizer.json", "preprocessor_config.json")):
        return
    vision = spec.vision
    config = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vision.patch_size,
              "vision_feature_select_strategy": "default" if vision.drop_class_token else "full",
              "num_additional_image_tokens": int(vision.class_token)}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_preprocessor_config(out: Path, images: ImageProcessor | None) -> None:
    """The run's image preprocessing as a preprocessor_config.json, unless one was carried: a preset's square
    resize is SigLIP's processor (resize to height × width, rescale, normalize)."""
    if images is None or (out / "preprocessor_config.json").exists():
        return
    config = {"image_processor_type": "SiglipImageProcessor", **dataclasses.asdict(images)}
    for key in ("image_mean", "image_std"):
        config[key] = list(config[key])
    _write_json(out / "preprocessor_config.json", {k: v for k, v in config.items() if v is not None})


def _write_chat_template(out: Path) -> None:
    """The tokenizer's chat template as chat_template.jinja (where `LlavaProcessor` reads it), unless carried."""
    if any((out / name).exists() for name in ("chat_template.jinja", "chat_template.json")):
        return
    path = out / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    if isinstance(template, str):
        (out / "chat_template.jinja").write_text(template)


def _write_special_ids(out: Path) -> None:
    """The tokenizer's BOS / EOS / pad ids in text_config (where the config has none) and a generation_config.json
    (unless carried), so transformers' `generate` stops at the EOS `mimo generate` stops at."""
    if not (out / "tokenizer.json").is_file():
        return
    prompter = Prompter.from_directory(out)
    ids = {f"{kind}_token_id": prompter.token_id(prompter.special_tokens.get(f"{kind}_token", ""))
           for kind in ("bos", "eos", "pad")}
    ids = {k: v for k, v in ids.items() if v is not None}
    config = json.loads((out / "config.json").read_text())
    config["text_config"] = {**ids, **config["text_config"]}
    _write_json(out / "config.json", config)
    if not (out / "generation_config.json").exists() and ids:
        _write_json(out / "generation_config.json", ids)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
