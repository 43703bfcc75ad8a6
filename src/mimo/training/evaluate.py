"""Held-out evaluation on one process: greedy generation with a whole (unwrapped) MimoModel."""

from __future__ import annotations

import torch

from mimo.data import DigitsDataset
from mimo.models import MimoModel, ModalityBatch


@torch.no_grad()
def greedy_generate(model: MimoModel, input_ids: torch.Tensor, modality_inputs: dict[str, ModalityBatch],
                    max_new_tokens: int) -> torch.Tensor:
    """Append `max_new_tokens` argmax tokens to every prompt [N, S] (prompts of one length, no padding).

    Modality embeddings are computed once; each new token re-runs the language model over the sequence
    (no KV cache: prompts here are a few dozen tokens).
    """
    embeddings = model.encode(modality_inputs)
    counts = model.tokens_per_sample(modality_inputs)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model.language_logits(model.align_embeddings(ids, embeddings, counts))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def digits_accuracy(model: MimoModel, dataset: DigitsDataset, batch_size: int = 128) -> float:
    """Caption accuracy on `dataset`: the generated word after "which digit ?" equals the digit's word."""
    model.eval()
    words = []
    dtype = next(model.parameters()).dtype
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        prompts = torch.stack([dataset.prompt_for_generation(i) for i in indices])
        images = torch.stack([dataset.image(i) for i in indices]).to(dtype)
        batch = {DigitsDataset.MODALITY: ModalityBatch(images, torch.ones(len(indices), dtype=torch.long))}
        generated = greedy_generate(model, prompts, batch, max_new_tokens=1)
        words += [dataset.tokenizer.decode(row) for row in generated]
    return dataset.caption_accuracy(words, list(range(len(dataset))))
