"""Bidirectional attention within segments of one packed sequence (a vision tower's images, frames or windows).

Packed patches are one sequence [1, heads, N, d]; a patch attends to every patch of its segment and to nothing
else (block-diagonal), so images of different sizes share a call with no padding. Two variants, picked by device
in one place (`segment_attention`): SDPA with an explicit [N, N] boolean mask (any device; the CPU path), flash
attention's varlen kernel over the segments' cumulative lengths on CUDA in bf16/fp16 (transformers' own path for
these towers), and compiled `flex_attention` with a block mask on CUDA in float32 (it skips the blocks outside
the diagonal). Built once per call from the segment lengths; every layer of a kind reuses its instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from mimo.models.attention import (
    FLEX_MIN_HEAD_DIM,
    compiled_flex_attention,
    use_varlen,
    varlen_attention,
    varlen_options,
)
from mimo.models.transfer import to_device


def segment_ids(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """[N] long: the segment number of each position (segments of `lengths`, back to back), built on the host
    and sent without blocking it (on a GPU, `repeat_interleave` of device counts reads their sum back)."""
    counts = torch.tensor(list(lengths), dtype=torch.long)
    ids = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return ids if device is None else to_device(ids, device)


class MaskedSegmentAttention:
    """Within-segment attention through SDPA and a [1, 1, N, N] block-diagonal boolean mask."""

    def __init__(self, lengths: Sequence[int], device: torch.device | str | None = None) -> None:
        """Build the mask once from the segment lengths."""
        ids = segment_ids(lengths, device)
        self.mask = (ids[:, None] == ids[None, :])[None, None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [1, heads, N, d] → [1, heads, N, d]; every position sees itself, so no row is empty."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class FlexSegmentAttention:
    """Within-segment attention through compiled `flex_attention` and a block mask (the CUDA path)."""

    def __init__(self, lengths: Sequence[int], device: torch.device | str | None = None) -> None:
        """Build the block mask once from the segment lengths (on `device`)."""
        ids = segment_ids(lengths, device)

        def same_segment(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return ids[q] == ids[kv]

        n = int(ids.shape[0])
        self.lengths, self.device = list(lengths), device
        self.block_mask = create_block_mask(same_segment, None, None, n, n, device=ids.device)
        self._attend = torch.compiler.disable(self._flex)  # its own compiled function, outside a block's graph

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [1, heads, N, d] → [1, heads, N, d]."""
        return self._attend(q, k, v)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """flex_attention on q, k, v of one dtype (rotary leaves q, k in float32 while v may be bf16); heads
        narrower than flex compiles take the explicit mask."""
        if q.shape[-1] < FLEX_MIN_HEAD_DIM:
            return MaskedSegmentAttention(self.lengths, self.device)(q, k, v)
        device = q.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
        return compiled_flex_attention()(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=self.block_mask)


class VarlenSegmentAttention:
    """Within-segment attention through flash attention's varlen kernel (CUDA, bf16/fp16): no mask at all."""

    def __init__(self, lengths: Sequence[int], device: torch.device | str | None = None) -> None:
        """The segments' cumulative lengths (on `device`) and the longest one."""
        sizes = [int(n) for n in lengths]
        bounds = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.cu_seqlens = bounds if device is None else to_device(bounds, device)
        self.longest = max(sizes, default=1)
        self.options = varlen_options(causal=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [1, heads, N, d] → [1, heads, N, d]."""
        return varlen_attention(q, k, v, self.cu_seqlens, self.longest, self.options)


SegmentAttention = MaskedSegmentAttention | VarlenSegmentAttention | FlexSegmentAttention


def segment_attention(lengths: Sequence[int], device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> SegmentAttention:
    """The within-segment variant for `device` and the attention's `dtype`: on CUDA the varlen kernel in
    bf16/fp16 (`use_varlen`), flex_attention otherwise; the explicit mask elsewhere."""
    if torch.device(device).type != "cuda":
        return MaskedSegmentAttention(lengths, device)
    if use_varlen(device, dtype):
        return VarlenSegmentAttention(lengths, device)
    return FlexSegmentAttention(lengths, device)
