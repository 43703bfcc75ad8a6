"""Greedy generation with a whole (unwrapped) MimoModel in one process: the one decoder that `mimo generate`
(`mimo.hf.generate`) and the held-out evaluation (`mimo.training.evaluate`) share.

Modality embeddings are computed once; each new token re-runs the language model over the whole sequence (no KV
cache: simple and exact, fine for checking a model and for prompts of a few dozen tokens, slow for long outputs).
Only the last position's logits are computed, as transformers' `generate` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mimo.models.mimo_model import MimoModel, ModalityBatch


@torch.no_grad()
def greedy_decode(model: MimoModel, input_ids: torch.Tensor, modality_inputs: Mapping[str, ModalityBatch],
                  max_new_tokens: int, eos_ids: Iterable[int] = ()) -> torch.Tensor:
    """The argmax continuation [N, K] of every prompt [N, S] (prompts of one length, no padding): K is
    `max_new_tokens`, or fewer once every row's last token is an end-of-sequence id (which is kept, as
    transformers' `generate` keeps it; a row that ended earlier goes on generating until the last has)."""
    embeddings, counts = model.encode(modality_inputs), model.tokens_per_sample(modality_inputs)
    decoder, eos, ids = model.language_model, torch.tensor(sorted(set(eos_ids)), dtype=torch.long), input_ids
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        hidden = decoder(**model.language_inputs(ids, embeddings, counts))
        token = decoder.logits(hidden[:, -1:]).argmax(-1)  # [N, 1]
        ids = torch.cat([ids, token], dim=1)
        if eos.numel():
            ended |= torch.isin(token[:, 0].cpu(), eos)
            if bool(ended.all()):
                break
    return ids[:, input_ids.shape[1]:]
