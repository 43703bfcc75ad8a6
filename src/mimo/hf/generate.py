"""`mimo generate`'s greedy generation about one sample's items, from a whole mimo model in one process (the decoder
itself: `mimo.models.generation.greedy_decode`), and the end-of-sequence ids it stops at.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from mimo.hf.prompt import Prompter
from mimo.models import ModalityBatch
from mimo.models.generation import greedy_decode


def greedy(model, input_ids: list[int], items: Mapping[str, torch.Tensor | ModalityBatch], max_new_tokens: int,
           eos_ids: Iterable[int] = (), positions: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[int]:
    """The greedy continuation of `input_ids`, up to an end-of-sequence id: one sample with the items of each
    modality of `items` (images [n, 3, H, W] under the family's image modality, or a `ModalityBatch` of one sample:
    packed images with their grids); `positions` as `greedy_decode` takes them (M-RoPE)."""
    model.eval()
    dtype = _dtype(model)
    batches = {m: x.with_items(x.items.to(dtype)) if isinstance(x, ModalityBatch)
               else ModalityBatch(x.to(dtype), torch.tensor([x.shape[0]], dtype=torch.long)) for m, x in items.items()}
    return greedy_decode(model, torch.tensor([input_ids]), batches, max_new_tokens, eos_ids,
                         positions=positions)[0].tolist()


def eos_token_ids(directory: str | Path) -> list[int]:
    """The end-of-sequence ids `generate` stops at: generation_config.json's, else the text config's."""
    directory = Path(directory)
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            value = data.get("eos_token_id", data.get("text_config", {}).get("eos_token_id"))
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


def stop_ids(directory: str | Path | None, prompter: Prompter) -> list[int]:
    """The ids generation stops at: the model directory's (`eos_token_ids`), else (a preset, `directory` None)
    the tokenizer's EOS token, as training put it after every answer."""
    if directory is not None:
        return eos_token_ids(directory)
    eos = prompter.token_id(prompter.special_tokens.get("eos_token", ""))
    return [] if eos is None else [eos]


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype
