"""What a Hugging Face model directory holds besides its weights and config.json (tokenizer, processor, chat
template, generation defaults), carried from where a model came from into its export; and dtype names as
`config.json` writes them. Every family's export uses these."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                 "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                 "generation_config.json")
TOKENIZER_FILES = CARRIED_FILES[:9]  # what a run's own tokenizer directory gives (not a model's processor)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}


def carry_files(directory: Path | str | None, out: Path, names: tuple[str, ...] = CARRIED_FILES) -> None:
    """Copy the tokenizer / processor / chat-template files (`names`) of `directory` that `out` lacks."""
    if directory is None:
        return
    for name in names:
        src = Path(directory) / name
        if src.is_file() and not (out / name).exists():
            shutil.copy2(src, out / name)


def dtype_name(dtype: torch.dtype) -> str:
    """`config.json`'s name of a dtype ("float32", ...)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
