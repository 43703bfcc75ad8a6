"""Random Hugging Face directories at a preset's real shapes, for benchmarks (nothing can be downloaded here).

`write_directory`: one `LlavaForConditionalGeneration` directory (`model.hf`). `write_pair`: a CLIP vision
tower directory and a Llama language model directory (`model.vision_hf` + `model.language_hf`, as LLaVA-1.5's
recipe and `examples/llava15_stage*.yaml` name them), with what `mimo train` reads besides the weights: the
tower's `preprocessor_config.json` (CLIP ViT-L/14-336's preprocessing) and the language model's tokenizer
(`write_tokenizer`). Weights are bfloat16 safetensors shards of at most 2 GiB (with an index when there are
several), under the names `save_pretrained` writes; each parameter drawn from N(0, 0.02²) with a fixed seed (on
the GPU if any).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SHARD_BYTES = 2 * 2**30
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_tensors(model, name_of: Callable[[str], str | None]) -> Iterator[tuple[str, Any]]:
    """(file name, random bfloat16 tensor) for each parameter of `model` (a meta model) that `name_of` names,
    drawn on the GPU when there is one (7B values: seconds there, about 100 s on the CPU; other values)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        file_name = name_of(name)
        if file_name is not None:
            yield file_name, (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()


def write_model(tensors: Iterator[tuple[str, Any]], directory: Path, config: dict[str, Any]) -> None:
    """The tensors streamed into shards of at most SHARD_BYTES (`mimo.hf.shards.write_safetensors`, as `mimo
    export-hf` writes them), then `config.json` (written last: it marks the directory done)."""
    from mimo.hf.shards import write_safetensors

    write_safetensors(tensors, directory, SHARD_BYTES)
    (directory / "config.json").write_text(json.dumps(config))


def write_directory(preset: str, directory: Path) -> None:
    """The preset's parameters, random, as a Hugging Face LLaVA directory (skipped if already written)."""
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.hf_config import LlavaSpec, llava_to_hf
    from mimo.families.llava.hf_load import to_llava_name
    from mimo.families.llava.hf_presets import HF_PRESETS

    if (directory / "config.json").is_file():
        return
    if preset in HF_PRESETS:
        provider = LlavaMimoProvider.preset(preset)
        config = {**HF_PRESETS[preset], "torch_dtype": "bfloat16"}
    else:  # a mimo preset, its image token moved into the vocabulary as transformers' LLaVA needs
        vocab = LlavaMimoProvider.preset(preset).language_config.vocab_size
        provider = LlavaMimoProvider.preset(preset, image_token_id=vocab - 1)
        spec = LlavaSpec(provider.vision_config, provider.language_config, vocab - 1)
        config = llava_to_hf(spec, provider.vision_config.num_layers_built, -1, vocab)
    write_model(random_tensors(provider.build_meta_model(), to_llava_name), directory, config)


def write_pair(preset: str, vision_dir: Path, language_dir: Path, language_layers: int | None = None) -> None:
    """The preset's tower and language model, random, as a CLIP vision directory (with its preprocessor config)
    and a Llama directory (with a tokenizer of its vocabulary); each skipped if already written. `language_layers`:
    the language model's first that many decoder layers only (a 7B's shapes on a GPU that cannot hold all 32).

    The tower's config has all its layers; the weights hold those mimo builds for the preset's feature layer
    (CLIP ViT-L/14-336 at LLaVA's -2: 23 of 24; the last is never computed). No projector: it starts fresh."""
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.hf_load import VISION
    from mimo.hf.config import language_to_hf, vision_to_hf

    provider = LlavaMimoProvider.preset(preset)
    if language_layers is not None:
        language = dataclasses.replace(provider.language_config, num_layers=language_layers)
        provider = LlavaMimoProvider.preset(preset, language_config=language)
    vision, language = provider.vision_config, provider.language_config
    model = None if (vision_dir / "config.json").is_file() and (language_dir / "config.json").is_file() \
        else provider.build_meta_model()
    if not (vision_dir / "config.json").is_file():
        config = {**vision_to_hf(vision, vision.num_layers), "torch_dtype": "bfloat16"}
        write_model(random_tensors(model, lambda n: n[len(VISION):] if n.startswith(VISION) else None),
                          vision_dir, config)
        write_preprocessor(vision_dir, vision.image_size)
    if not (language_dir / "config.json").is_file():
        write_tokenizer(language_dir, language.vocab_size)
        config = {**language_to_hf(language, language.vocab_size), "torch_dtype": "bfloat16",
                  "bos_token_id": 1, "eos_token_id": 2}
        write_model(random_tensors(model, _language_name), language_dir, config)


def _language_name(name: str) -> str | None:
    """A `LlamaForCausalLM` file's name for mimo parameter `name` (None: not the language model's)."""
    from mimo.families.llava.hf_load import LANGUAGE

    if not name.startswith(LANGUAGE):
        return None
    rest = name[len(LANGUAGE):]
    return rest if rest.startswith("lm_head.") else "model." + rest


def write_preprocessor(directory: Path, image_size: int) -> None:
    """openai/clip-vit-large-patch14-336's preprocessing at `image_size`: shortest edge resized (bicubic),
    center crop, rescale, CLIP's mean and std."""
    config = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
              "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
              "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD)}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=1))


def tokenizer_word(token_id: int) -> str:
    """The one word `write_tokenizer`'s vocabulary has for `token_id` (ids 3 and up)."""
    return f"w{token_id}"


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A Vicuna-shaped tokenizer of `vocab_size` ids: Llama's <unk> <s> </s> (0, 1, 2), then one word per id
    (`tokenizer_word`), split at whitespace, so a text of n such words is n tokens; <s> prepended as Llama's
    tokenizer does. Like Vicuna's it has no <image>: mimo adds one at id `vocab_size` (32000 for Vicuna-7B,
    where llava-hf puts it) and maps it to the model's image id. A word outside the vocabulary is <unk>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *(tokenizer_word(i) for i in range(3, vocab_size))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
