"""Real LLaVA-format files for the tests: a word-level tokenizer directory, PNG images and a JSON / JSONL file.

Every word of the tokenizer is one token (split at whitespace; special tokens split out wherever they sit), so
a test reads the labelled tokens back as words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mimo.data.image_inputs import FixedSizeImages
from mimo.data.llava import LlavaDataset
from mimo.families.llava import IMAGES
from mimo.hf.image import ImageProcessor
from mimo.hf.prompt import Prompter

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>")
WORDS = ("USER:", "ASSISTANT:", "user", "assistant", "system", "look", "at", "this", "what", "is", "it", "a", "cat",
         "dog", "and", "now", "two", "pictures", "same", "no", "be", "brief", "hello", "hi", "how", "are", "you?",
         "fine", "caption")
# ChatML: "<|im_start|>role\ncontent<|im_end|>\n" per turn, "<|im_start|>assistant\n" as the generation prompt
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_TOKEN_ID = 100  # the model's image id: not the tokenizer's <image> (4), so expansion must map it
TOKENS_PER_IMAGE = 3


def save_tokenizer(directory: Path, chat_template: str | None = CHATML, bos: bool = True,
                   image_token: bool = True) -> Path:
    """A word-level tokenizer.json (+ tokenizer_config.json): the specials (without `<image>` unless
    `image_token`), then WORDS; `<s>` prepended when `bos` (as Llama's tokenizer does)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    specials = [t for t in SPECIALS if image_token or t != "<image>"]
    vocab = {w: i for i, w in enumerate((*specials, *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def save_image(path: Path, width: int = 8, height: int = 8, seed: int = 0) -> Path:
    """A random RGB PNG."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (width, height), bytes(data.flatten().tolist())).save(path)
    return path


def save_entries(path: Path, entries: list[Any]) -> Path:
    """A JSON array, or JSONL (one entry a line) when the name ends in .jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.write_text(json.dumps(entries))
    return path


def pretrain_entry(image: str = "a.png", caption: str = "a cat") -> dict[str, Any]:
    """A LLaVA-Pretrain caption entry."""
    return {"id": image, "image": image, "conversations": [{"from": "human", "value": "<image>\ncaption"},
                                                           {"from": "gpt", "value": caption}]}


def dataset(tmp_path: Path, entries: list[Any], name: str = "data.json", **kw: Any) -> LlavaDataset:
    """A LlavaDataset over `entries` written to tmp_path/name (see `open_dataset`)."""
    return open_dataset(tmp_path, save_entries(tmp_path / name, entries), **kw)


def open_dataset(tmp_path: Path, path: Path, template: str = "chat", chat_template: str | None = CHATML,
                 image_folder: Path | None = None, image_token: bool = True, **kw: Any) -> LlavaDataset:
    """A LlavaDataset over the file `path`, images from tmp_path/images (8×8: the model's size), the tokenizer
    saved to tmp_path/tokenizer, float64 pixels."""
    tokenizer = save_tokenizer(tmp_path / "tokenizer", chat_template, image_token=image_token)
    kw = {"modality": IMAGES, "image_token_id": IMAGE_TOKEN_ID, "max_seq_len": 64, "template": template,
          "dtype": torch.float64, **kw}
    return LlavaDataset(path, image_folder or tmp_path / "images", Prompter.from_directory(tokenizer),
                        FixedSizeImages(ImageProcessor.square(8), (8, 8), TOKENS_PER_IMAGE), **kw)


def words(data: LlavaDataset, ids: torch.Tensor) -> list[str]:
    """The words of `ids`, the model's image id read as <IMG>."""
    return [("<IMG>" if i == IMAGE_TOKEN_ID else data.prompter.tokenizer.id_to_token(i)) for i in ids.tolist()]


def learned(data: LlavaDataset, index: int) -> list[str]:
    """The words sample `index`'s labels ask for (next-token targets, in order)."""
    labels = data[index].labels
    return words(data, labels[labels != -100])
