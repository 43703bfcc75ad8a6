"""Which positions a decoder position attends to: one small class per variant, built once per micro-batch.

`CausalAttention`: every row is one sample (the padded layout); SDPA's causal kernel.
`MaskedDocumentAttention` and `FlexDocumentAttention`: a packed row holds several samples ("documents",
numbered per token by `document_ids`) and a position attends only to earlier positions of its own document.
The first passes SDPA an explicit boolean mask (any device; the CPU path, since flex_attention has no CPU
backward); the second is `flex_attention` with a block mask, compiled (the CUDA path: it skips the blocks a
document mask empties). `document_attention` picks between the two by device, in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


class Attention(Protocol):
    """Attention of q [R, heads, T, d] over k, v [R, kv heads, T, d] (grouped-query) → [R, heads, T, d]."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class CausalAttention:
    """Each row is one sequence: position t attends to positions 0..t of its row."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA's causal kernel (the unpacked path, unchanged)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


CAUSAL = CausalAttention()


class MaskedDocumentAttention:
    """Causal within each document of a packed row, through SDPA with an explicit [R, 1, T, T] boolean mask."""

    def __init__(self, document_ids: torch.Tensor) -> None:
        """Build the mask once from `document_ids` [R, T]; every layer reuses it."""
        same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
        self.mask = (same & torch.ones_like(same[0]).tril()).unsqueeze(1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA with the document-causal mask (every position sees itself, so no row is fully masked)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


class FlexDocumentAttention:
    """Causal within each document of a packed row, through compiled `flex_attention` and a block mask."""

    def __init__(self, document_ids: torch.Tensor) -> None:
        """Build the block mask once from `document_ids` [R, T] (on their device); every layer reuses it."""
        def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

        rows, length = document_ids.shape
        self.block_mask = create_block_mask(document_causal, rows, None, length, length,
                                            device=document_ids.device)
        # made here, not as a decorator: `torch.compiler.disable` imports dynamo, seconds for every process
        self._attend = torch.compiler.disable(self._flex)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Document-causal attention of q, k, v [R, H, T, D], outside any enclosing compiled graph."""
        return self._attend(q, k, v)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """flex_attention over the blocks the mask keeps, on q, k, v of one dtype: autocast's, as SDPA would take
        under autocast (rotary leaves q, k in the residual's float32 while v is bf16), else their common one.
        Kept out of an enclosing compiled block's graph (the block breaks around it): traced inside, every
        micro-batch's new mask (its closure, its lengths) is guarded and a block recompiled per packed length
        until torch's recompile limit sent it back to eager, unfused flex; here `compiled_flex_attention()` is
        its own compiled function, dynamic in the length after its second one. The block's own graphs still guard
        on a few length ranges (one compilation each; benchmarks/DATA.md: packed compiled 0.86x padded)."""
        device = q.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
        attend = compiled_flex_attention()
        return attend(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=self.block_mask, enable_gqa=True)


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (eager flex materializes every score). Made on first use, not at
    import: `torch.compile` imports dynamo and inductor, seconds that every process importing the models paid."""
    return torch.compile(flex_attention)


def document_attention(document_ids: torch.Tensor) -> MaskedDocumentAttention | FlexDocumentAttention:
    """The document-causal variant for the ids' device: flex_attention on CUDA, the explicit mask elsewhere."""
    if document_ids.device.type == "cuda":
        return FlexDocumentAttention(document_ids)
    return MaskedDocumentAttention(document_ids)
