"""Greedy generation with a whole (unwrapped) MimoModel in one process: the one decoder that `mimo generate`,
`mimo eval` and the held-out answers during training share.

Modality embeddings are computed once. With the KV cache (`mimo.models.kv_cache`, the default) the prompt runs once
and each new token costs one position; without it (`use_cache=False`, the reference the cache is tested against)
every step re-runs the whole sequence. Prompts of different lengths are left-padded (`prompt_mask`): each row
numbers its own tokens from 0 and no real token attends to padding, so a row generates what it would alone (up to
rounding). Only the last position's logits are computed, as transformers' `generate` does. Generated ids are text:
the prompt's special tokens take the modality embeddings, a generated one is embedded as a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from mimo.models.decoder import Decoder
from mimo.models.kv_cache import KVCache
from mimo.models.mimo_model import MimoModel, ModalityBatch


@torch.no_grad()
def greedy_decode(model: MimoModel, input_ids: torch.Tensor, modality_inputs: Mapping[str, ModalityBatch],
                  max_new_tokens: int, eos_ids: Iterable[int] = (),
                  positions: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  prompt_mask: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
    """The argmax continuation [N, K] of every prompt [N, S]: K is `max_new_tokens`, or fewer once every row's
    last token is an end-of-sequence id (which is kept, as transformers' `generate` keeps it; a row that ended
    earlier goes on generating until the last has). `prompt_mask` [N, S]: False at each row's left padding (its
    ids any non-special id). `positions(prompt ids)`: the prompt's M-RoPE positions [3, N, S] where the model
    numbers tokens so (unpadded prompts); each generated token then takes the next position on every axis
    (transformers' rope deltas)."""
    embeddings, counts = model.encode(modality_inputs), model.tokens_per_sample(modality_inputs)
    decoder, eos = model.language_model, torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    prompt = model.language_inputs(input_ids, embeddings, counts)  # checked once: the prompt's special tokens
    layout = _Layout(input_ids, prompt_mask, positions)
    step = _Cached(decoder, prompt, layout, max_new_tokens) if use_cache else _Uncached(decoder, prompt, layout)
    hidden, new = step.prompt(), []
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for k in range(max_new_tokens):
        token = decoder.logits(hidden).argmax(-1)  # [N, 1]
        new.append(token)
        if eos.numel():
            ended |= torch.isin(token[:, 0].cpu(), eos)
        if k + 1 == max_new_tokens or bool(ended.all()):
            break
        hidden = step.next(token, k)
    return torch.cat(new, dim=1) if new else input_ids.new_empty(input_ids.shape[0], 0)


class _Layout:
    """Where each token sits: the prompt's positions (per row from 0 past its padding, or M-RoPE's [3, N, S]),
    each row's next position, and which prompt positions are padding."""

    def __init__(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                 positions: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Number the prompt's tokens (see `greedy_decode`)."""
        self.padded = prompt_mask is not None and not bool(prompt_mask.all())
        if positions is not None and self.padded:
            raise ValueError("M-RoPE positions are for unpadded prompts; decode padded rows with 1-D positions")
        self.valid = torch.ones_like(input_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
        if positions is not None:
            self.prompt = positions(input_ids)
            self.following = self.prompt.amax(dim=(0, 2)) + 1  # [N]: each row's next position
        else:
            self.prompt = (self.valid.long().cumsum(1) - 1).clamp(min=0)
            self.following = self.valid.sum(1)

    def generated(self, start: int, stop: int) -> torch.Tensor:
        """Positions of generated tokens start..stop-1 ([N, k], or [3, N, k] for M-RoPE)."""
        steps = self.following[:, None] + torch.arange(start, stop, device=self.following.device)
        return steps if self.prompt.dim() == 2 else steps.expand(self.prompt.shape[0], -1, -1)

    def whole(self, generated: int) -> dict[str, torch.Tensor]:
        """The decoder's position_ids (and, for padded rows, document_ids: padding one document, the row's tokens
        another) for the prompt and `generated` new tokens."""
        out = {"position_ids": torch.cat([self.prompt, self.generated(0, generated)], dim=-1)}
        if self.padded:
            real = torch.ones(self.valid.shape[0], generated, dtype=torch.long, device=self.valid.device)
            out["document_ids"] = torch.cat([self.valid.long(), real], dim=1)
        return out


class _Cached:
    """Decoding with a KV cache: the prompt once, then one position per generated token."""

    def __init__(self, decoder: Decoder, prompt: dict, layout: _Layout, max_new_tokens: int) -> None:
        """A cache for the prompt and every token but the last (which is never fed back)."""
        self.decoder, self.inputs, self.layout = decoder, prompt, layout
        self.cache = KVCache(layout.valid.shape[1] + max(max_new_tokens - 1, 0))

    def prompt(self) -> torch.Tensor:
        """The prompt's last hidden state [N, 1, H], its keys and values cached."""
        step = self.cache.step(self.layout.valid)
        return self.decoder(**self.inputs, position_ids=self.layout.prompt, cache=step)[:, -1:]

    def next(self, token: torch.Tensor, k: int) -> torch.Tensor:
        """The hidden state of generated token `k` [N, 1] (its keys and values cached)."""
        step = self.cache.step(torch.ones_like(token, dtype=torch.bool))
        return self.decoder(input_ids=token, position_ids=self.layout.generated(k, k + 1), cache=step)


class _Uncached:
    """Decoding without a cache: every step runs the prompt and the tokens generated so far again."""

    def __init__(self, decoder: Decoder, prompt: dict, layout: _Layout) -> None:
        """Keep the prompt's inputs; the generated ids grow."""
        self.decoder, self.inputs, self.layout = decoder, prompt, layout
        self.new = prompt["input_ids"].new_empty(prompt["input_ids"].shape[0], 0)

    def prompt(self) -> torch.Tensor:
        """The prompt's last hidden state [N, 1, H]."""
        return self._last()

    def next(self, token: torch.Tensor, k: int) -> torch.Tensor:
        """The last hidden state once generated token `k` is appended."""
        self.new = torch.cat([self.new, token], dim=1)
        return self._last()

    def _last(self) -> torch.Tensor:
        """The whole sequence through the decoder; its last position."""
        ids = torch.cat([self.inputs["input_ids"], self.new], dim=1)
        pad = torch.zeros_like(self.new, dtype=torch.bool)  # a generated special id is text: no embedding there
        embeddings_at = [(torch.cat([where, pad], dim=1), values) for where, values in self.inputs["embeddings_at"]]
        hidden = self.decoder(input_ids=ids, embeddings_at=embeddings_at, **self.layout.whole(self.new.shape[1]))
        return hidden[:, -1:]
