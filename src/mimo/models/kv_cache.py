"""A key/value cache for incremental decoding: each layer's keys and values of the positions decoded so far.

Greedy generation (`mimo.models.generation`) runs the prompt once and then one new position a step; every
layer's attention writes the new positions' keys and values after the cached ones and attends over all of
them (`CacheStep`), so a step costs one position, not the whole sequence. Rows of a batch may be left-padded:
`valid` marks the real positions, and no query attends to a padding key (a padding query sees only itself,
so no row of the mask is empty and SDPA returns no NaN). One process, one model: nothing here is distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values [B, kv heads, capacity, d] per layer, filled up to `length` positions."""

    def __init__(self, capacity: int) -> None:
        """A cache for up to `capacity` positions (the prompt and the tokens to generate); buffers are made on a
        layer's first write, with its keys' shape, dtype and device."""
        self.capacity = capacity
        self.length = 0
        self.valid: torch.Tensor | None = None  # [B, capacity]: which cached positions are real (not padding)
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, valid: torch.Tensor) -> CacheStep:
        """Open the next forward over S new positions (`valid` [B, S]: False at left padding): the attention they
        use and the place each layer writes them."""
        start, stop = self.length, self.length + valid.shape[1]
        if stop > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {stop} were asked for")
        if self.valid is None:
            self.valid = torch.zeros(valid.shape[0], self.capacity, dtype=torch.bool, device=valid.device)
        self.valid[:, start:stop] = valid
        self.length = stop
        return CacheStep(self, start, stop)

    def write(self, layer: str, start: int, stop: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s keys and values [B, h, S, d] at positions [start, stop); all of its [0, stop)."""
        if layer not in self._layers:
            shape = (*keys.shape[:2], self.capacity, keys.shape[-1])
            self._layers[layer] = (keys.new_empty(shape), values.new_empty(shape))
        cached_keys, cached_values = self._layers[layer]
        cached_keys[:, :, start:stop] = keys
        cached_values[:, :, start:stop] = values
        return cached_keys[:, :, :stop], cached_values[:, :, :stop]


class CacheStep:
    """One forward's new positions [start, stop) of a `KVCache`: the attention of their queries over every cached
    key (causal, padding keys masked out) and each layer's write (`layer`)."""

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        """Build the [B, 1, S, stop] mask once; every layer reuses it."""
        self.cache, self.start, self.stop = cache, start, stop
        valid = cache.valid[:, :stop]
        queries = torch.arange(start, stop, device=valid.device)[:, None]
        keys = torch.arange(stop, device=valid.device)[None, :]
        self.mask = ((keys <= queries) & (valid[:, None, :] | (keys == queries))).unsqueeze(1)

    def layer(self, name: str) -> LayerCache:
        """Layer `name`'s view of this step (its attention calls `update` with the new keys and values)."""
        return LayerCache(self, name)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, heads, S, d] over every cached k, v [B, kv heads, stop, d] (grouped-query), through SDPA."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


class LayerCache:
    """What one layer's attention sees of a `CacheStep`: where its new keys and values go."""

    def __init__(self, step: CacheStep, name: str) -> None:
        """Bind the step and the layer's (global) index."""
        self.step, self.name = step, name

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values [B, h, S, d]; every cached one [B, h, stop, d]."""
        return self.step.cache.write(self.name, self.step.start, self.step.stop, keys, values)
