"""Greedy generation from a whole mimo model in one process: what `mimo generate` prints.

The items (an image) are encoded once; each new token re-runs the language model over the whole sequence (no KV cache:
simple and exact, fine for checking a model, slow for long outputs). Stops after `max_new_tokens` or at an
end-of-sequence id, which is kept, as transformers' `generate` keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mimo.models import ModalityBatch


@torch.no_grad()
def greedy(model, input_ids: list[int], items: Mapping[str, torch.Tensor], max_new_tokens: int,
           eos_ids: Iterable[int] = ()) -> list[int]:
    """The greedy continuation of `input_ids`: one sample with one item per modality of `items` (an image
    [3, H, W] under the family's image modality)."""
    model.eval()
    batches = {m: ModalityBatch(x.unsqueeze(0).to(_dtype(model)), torch.ones(1, dtype=torch.long))
               for m, x in items.items()}
    embeddings, counts = model.encode(batches), model.tokens_per_sample(batches)
    ids, eos, new = torch.tensor([input_ids]), set(eos_ids), []
    decoder = model.language_model
    for _ in range(max_new_tokens):
        hidden = decoder(**model.language_inputs(ids, embeddings, counts))
        token = int(decoder.logits(hidden[:, -1:]).argmax(-1))
        new.append(token)
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


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


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype
