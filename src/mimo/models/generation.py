"""Greedy generation with a whole (unwrapped) MimoModel in one process: the one decoder that `mimo generate`
(`mimo.hf.generate`) and the held-out evaluation (`mimo.training.evaluate`) share.

Modality embeddings are computed once; each new token re-runs the language model over the whole sequence (no KV
cache: simple and exact, fine for checking a model and for prompts of a few dozen tokens, slow for long outputs).
Only the last position's logits are computed, as transformers' `generate` does. Generated ids are text: the
prompt's special tokens take the modality embeddings, a generated one is embedded as a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from mimo.models.mimo_model import MimoModel, ModalityBatch


@torch.no_grad()
def greedy_decode(model: MimoModel, input_ids: torch.Tensor, modality_inputs: Mapping[str, ModalityBatch],
                  max_new_tokens: int, eos_ids: Iterable[int] = (),
                  positions: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The argmax continuation [N, K] of every prompt [N, S] (prompts of one length, no padding): K is
    `max_new_tokens`, or fewer once every row's last token is an end-of-sequence id (which is kept, as
    transformers' `generate` keeps it; a row that ended earlier goes on generating until the last has).
    `positions(prompt ids)`: the prompt's M-RoPE positions [3, N, S] where the model numbers tokens so; each
    generated token then takes the next position on every axis (transformers' rope deltas)."""
    embeddings, counts = model.encode(modality_inputs), model.tokens_per_sample(modality_inputs)
    decoder, eos = model.language_model, torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    prompt = model.language_inputs(input_ids, embeddings, counts)  # checked once: the prompt's special tokens
    prompt_positions = None if positions is None else positions(input_ids)
    new = input_ids.new_empty(input_ids.shape[0], 0)
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        hidden = decoder(**_extended(prompt, new), **_positions(prompt_positions, new.shape[1]))
        token = decoder.logits(hidden[:, -1:]).argmax(-1)  # [N, 1]
        new = torch.cat([new, token], dim=1)
        if eos.numel():
            ended |= torch.isin(token[:, 0].cpu(), eos)
            if bool(ended.all()):
                break
    return new


def _extended(prompt: dict, new: torch.Tensor) -> dict:
    """The prompt's language inputs followed by the generated ids, which are text: a generated id that is a
    modality's special token (a model may emit its image token, as transformers' LLaVA lets it) is embedded as
    the token it is, and no modality embedding goes there."""
    ids = torch.cat([prompt["input_ids"], new], dim=1)
    pad = torch.zeros_like(new, dtype=torch.bool)
    return {"input_ids": ids, "embeddings_at": [(torch.cat([where, pad], dim=1), values)
                                                for where, values in prompt["embeddings_at"]]}


def _positions(prompt: torch.Tensor | None, generated: int) -> dict[str, torch.Tensor]:
    """The decoder's position_ids for the prompt and `generated` new tokens (none: the default 0, 1, ...)."""
    if prompt is None:
        return {}
    following = prompt.amax(dim=(0, 2)) + 1  # [N]: each row's next position
    steps = following[:, None] + torch.arange(generated, device=prompt.device)  # [N, k]
    return {"position_ids": torch.cat([prompt, steps.expand(prompt.shape[0], -1, -1)], dim=2)}
