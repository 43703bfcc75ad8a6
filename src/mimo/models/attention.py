"""Which positions a decoder position attends to: one small class per variant, built once per micro-batch.

`CausalAttention`: every row is one sample (the padded layout); SDPA's causal kernel.
`MaskedDocumentAttention`, `VarlenDocumentAttention` and `FlexDocumentAttention`: a packed row holds several
samples ("documents", numbered per token by `document_ids`) and a position attends only to earlier positions of
its own document. The first passes SDPA an explicit boolean mask (any device; the CPU path, since the others
have no CPU kernel); the second is flash attention's variable-length kernel over cumulative document lengths
(CUDA: no mask at all, and a custom op that compiled blocks trace whole); the third is `flex_attention` with a
block mask (CUDA, where torch lacks the varlen kernel). `document_attention` picks by device, in one place.
"""

from __future__ import annotations

import functools
import inspect
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
        self.document_ids = document_ids
        self.block_mask = create_block_mask(document_causal, rows, None, length, length,
                                            device=document_ids.device)
        # made here, not as a decorator: `torch.compiler.disable` imports dynamo, seconds for every process
        self._attend = torch.compiler.disable(self._flex)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Document-causal attention of q, k, v [R, H, T, D], outside any enclosing compiled graph."""
        return self._attend(q, k, v)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """flex_attention over the blocks the mask keeps, on q, k, v of one dtype (`attention_dtype`). Kept out
        of an enclosing compiled block's graph (the block breaks around it): traced inside, every micro-batch's
        new mask (its closure, its lengths) is guarded and a block recompiled per packed length until torch's
        recompile limit sent it back to eager, unfused flex; here `compiled_flex_attention()` is its own compiled
        function, dynamic in the length after its second one. The block's own graphs still guard on a few length
        ranges (one compilation each; benchmarks/DATA.md: packed compiled 0.86x padded)."""
        if q.shape[-1] < FLEX_MIN_HEAD_DIM:
            return MaskedDocumentAttention(self.document_ids)(q, k, v)
        dtype = attention_dtype(q, k, v)
        attend = compiled_flex_attention()
        return attend(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=self.block_mask, enable_gqa=True)


class VarlenDocumentAttention:
    """Causal within each document of packed rows, through flash attention's variable-length kernel: the rows'
    tokens are one sequence of documents bounded by cumulative lengths (`cu_seqlens`), so nothing is masked.
    bf16/fp16 only (flash's dtypes): `document_attention` picks it for those."""

    def __init__(self, document_ids: torch.Tensor, bounds: torch.Tensor | None = None) -> None:
        """Cumulative document lengths of the rows [R, T] end to end: `bounds` where the data found them on the
        host (`LanguageText.document_bounds`, no sync), else found here (one host sync per micro-batch)."""
        self.cu_seqlens = document_bounds(document_ids) if bounds is None else bounds
        self.options = varlen_options(causal=True)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [R, H, T, D], k, v [R, Hkv, T, D] → [R, H, T, D]. The longest document is bounded by T, a shape:
        a compiled block guards on no per-batch number."""
        return varlen_attention(q, k, v, self.cu_seqlens, q.shape[2], self.options)


def document_bounds(document_ids: torch.Tensor) -> torch.Tensor:
    """The varlen kernel's cumulative lengths (int32) of rows [R, T] of documents end to end: each document's start,
    then R·T (a row's start always starts a document). On a device tensor, `nonzero` reads its count back."""
    rows, length = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    bounds = starts.flatten().nonzero().flatten()
    return torch.cat([bounds, bounds.new_tensor([rows * length])]).to(torch.int32)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int,
                     options: dict[str, object]) -> torch.Tensor:
    """q [R, H, T, D], k, v [R, Hkv, T, D] as one sequence of R·T tokens cut at `cu_seqlens` (no sequence longer
    than `longest`), attended within each piece by flash's varlen kernel in one dtype (`attention_dtype`), with
    `varlen_options` (causal or not)."""
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, length, dim = q.shape
    dtype = attention_dtype(q, k, v)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim).to(dtype)

    out = varlen_attn(tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens, longest, longest, **options)
    return out.view(rows, length, heads, dim).transpose(1, 2)


@functools.cache
def varlen_options(causal: bool) -> dict[str, object]:
    """`varlen_attn`'s keywords in this torch: 2.11 takes `is_causal` and runs grouped-query heads natively;
    newer ones take a `window_size` ((-1, 0) causal, (-1, -1) full) and `enable_gqa`. Found once per process,
    by the attention objects outside compiled graphs (dynamo would trace through the cache)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        options: dict[str, object] = {"is_causal": causal}
    else:
        options = {"window_size": (-1, 0) if causal else (-1, -1)}
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in for activations like `hidden`: autocast's where it is on, else theirs."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


@functools.cache
def has_varlen_attention() -> bool:
    """Whether this torch ships `torch.nn.attention.varlen.varlen_attn` (flash attention's varlen kernel)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The one dtype q, k, v are attended in: autocast's, as SDPA would take under autocast (rotary leaves q, k
    in the residual's float32 while v is bf16), else their common one."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


# Compiled flex_attention's smallest head width (inductor: "embedding dimension ... must be at least 16"); the
# flex variants hand narrower heads (tiny test models) to SDPA with the explicit mask.
FLEX_MIN_HEAD_DIM = 16


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (eager flex materializes every score). Made on first use, not at
    import: `torch.compile` imports dynamo and inductor, seconds that every process importing the models paid."""
    return torch.compile(flex_attention)


DocumentAttention = MaskedDocumentAttention | VarlenDocumentAttention | FlexDocumentAttention

# The CUDA kernel for packed rows: "varlen" (flash attention's variable-length kernel, where torch ships it) or
# "flex" (flex_attention). Read by `document_attention` alone; benchmarks/packing.py sets it to compare the two.
CUDA_DOCUMENT_KERNEL = "varlen"


def use_varlen(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether packed attention on `device` in `dtype` takes flash's varlen kernel: CUDA, bf16/fp16, a torch that
    ships it, and `CUDA_DOCUMENT_KERNEL` not asking for flex."""
    return (torch.device(device).type == "cuda" and dtype in HALF_DTYPES and CUDA_DOCUMENT_KERNEL == "varlen"
            and has_varlen_attention())


def document_attention(document_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                       bounds: torch.Tensor | None = None) -> DocumentAttention:
    """The document-causal variant for the ids' device and the attention's `dtype`: on CUDA the varlen kernel in
    bf16/fp16 (`use_varlen`; over `bounds`, `document_bounds` found on the host, when given), flex_attention
    otherwise; the explicit mask elsewhere."""
    if document_ids.device.type != "cuda":
        return MaskedDocumentAttention(document_ids)
    if use_varlen(document_ids.device, dtype):
        return VarlenDocumentAttention(document_ids, bounds)
    return FlexDocumentAttention(document_ids)
