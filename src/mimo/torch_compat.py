"""Mends for bugs of the older torch releases mimo runs on (the GPU machine has 2.11), each applied only where
that release's code is the one with the bug, and harmless elsewhere.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import _redistribute
from torch.distributed.tensor.placement_types import Shard


def contiguous_uneven_gathers() -> None:
    """A dimension that does not split evenly over a mesh dimension (a ViT's 577 tokens over TP2, 13 text tokens
    over TP2) is all-gathered padded, then narrowed: a tensor that is not contiguous. torch before its nested
    redistribute (2.11) labels such a gather in backward with the incoming gradient's contiguous strides, and the
    next linear's backward view of it fails ("view size is not compatible with input tensor's size and stride").
    Sequence parallelism meets it on every block. The narrowed gather is made contiguous here (a copy, only when
    the dimension was padded)."""
    if hasattr(_redistribute, "NestedRedistribute") or getattr(Shard._maybe_unpad_tensor, "mimo_contiguous", False):
        return
    narrowed = Shard._maybe_unpad_tensor

    def unpadded(self: Shard, local_tensor: torch.Tensor, logical_dim_size: int, num_chunks: int) -> torch.Tensor:
        result = narrowed(self, local_tensor, logical_dim_size, num_chunks)
        return result if result is local_tensor else result.contiguous()

    unpadded.mimo_contiguous = True  # type: ignore[attr-defined]
    Shard._maybe_unpad_tensor = unpadded
