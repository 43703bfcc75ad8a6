"""Context parallelism (CP) of the language model: each CP rank holds a share of every sequence, applied from outside.

**The split.** After the modality embeddings are spliced in, a sequence (a padded row, or each sample of a packed
row: `document_ids`) is cut into 2·CP equal chunks and CP rank r keeps chunks r and 2·CP-1-r (causal load
balance: an early chunk, cheap to attend from, and a late one; Megatron's and torch's `context_parallel` split).
A sequence whose length does not divide by 2·CP is padded at its end with positions of their own (no label, a
document of pads that attends only to pads). The split is a choice of columns, decided on the host from the
text every rank holds (`split_columns`), so a rank knows every other rank's columns without communicating.
`split_text` cuts a micro-batch share's `LanguageText` into this rank's `ContextText`: ids, labels, rotary
positions (M-RoPE's [3, R, T] too) of the unsplit sequence, and which modality embedding rows every CP rank's
chunks hold (`every_rank_rows`: what the encoder's rows are routed by): splicing the whole sequence then keeping the
chunks equals keeping the rows the chunks hold.

**The attention.** `ContextParallelAttention` all-gathers K and V over the CP group (`gather_sequence`: the
backward reduce-scatters their gradients; outside any compiled graph) and lets each local query see the gathered
keys that are in its own document and not after it in the unsplit row (`context_mask`, from the global columns
and documents): exact for any split. On CUDA the core is compiled `flex_attention` over a block mask built once
per micro-batch, so the key blocks no query of a block sees (other documents, later chunks) are skipped: about
the query-key pairs CP1's varlen kernel computes, not all CP·L keys of every query. On the CPU (the float64
parity tests) and for heads narrower than compiled flex takes, an explicit SDPA mask built per block of queries
inside a core recomputed in the backward.
The decoder takes it as its `attention` argument; nothing in `mimo.models` knows about process groups.
The loss is each rank's chunks' summed cross-entropy; the step divides by the label count of the whole global
batch and sums the loss over CP ranks, so the loss and the gradients are those of the unsplit sequence.

**The encoder's rows** reach each CP rank only where its chunks hold them (`chunk_rows`, known on every rank from the
host text): a homogeneous encoder's CP ranks each encode a share of the replica's images by patch count and one
all-to-all gives each CP rank its chunks' rows (`training.patch_balance.chunk_route`); the colocated and the
heterogeneous bridges deliver each CP rank its chunks' rows (`mimo.bridge`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint

from mimo.data.packing import LanguageText
from mimo.models.attention import FLEX_MIN_HEAD_DIM, attention_dtype, compiled_flex_attention, document_bounds
from mimo.models.labels import IGNORE_INDEX
from mimo.models.transfer import to_device
from mimo.torch_compat import compiler_loaded

PAD = -1  # the source column of a split's padding position, and the document of pads


def balanced_chunks(size: int) -> list[tuple[int, int]]:
    """The two chunks (of 2·size) each CP rank keeps: rank r's are r and 2·size-1-r."""
    return [(r, 2 * size - 1 - r) for r in range(size)]


def split_columns(length: int, documents: torch.Tensor | None, size: int) -> list[torch.Tensor]:
    """Per CP rank, the source columns [L] it keeps of a row of `length` columns (PAD for padding), every rank the
    same L. `documents` [T] (a packed row) splits each run of one document on its own; None splits the whole row."""
    chunks: list[list[torch.Tensor]] = [[] for _ in range(size)]
    for start, stop in _segments(length, documents):
        n = stop - start
        padded = -(-n // (2 * size)) * 2 * size
        columns = torch.cat([torch.arange(start, stop), torch.full((padded - n,), PAD, dtype=torch.long)])
        pieces = columns.view(2 * size, -1)
        for r, (head, tail) in enumerate(balanced_chunks(size)):
            chunks[r] += [pieces[head], pieces[tail]]
    return [torch.cat(c) if c else torch.zeros(0, dtype=torch.long) for c in chunks]


def _segments(length: int, documents: torch.Tensor | None) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal document ids (the whole row when there are none)."""
    if documents is None or length == 0:
        return [(0, length)] if length else []
    bounds = document_bounds(documents[None]).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class ContextText(LanguageText):
    """This CP rank's chunks of a micro-batch share's text (see the module docstring). `key_columns` [CP·L]: every
    rank's columns in rank order (what the gathered K/V hold), padding numbered past the row; `key_documents`
    [R or 1, CP·L] their documents (PAD for padding); `every_rank_rows` per special token id, per CP rank, which
    rows of the share's embeddings [n, H] (row-major) its chunks hold, in its order (on the host: what routes the
    encoder's rows to each CP rank); `group` the CP group."""

    key_columns: torch.Tensor = None
    key_documents: torch.Tensor = None
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    every_rank_rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        """The decoder's layout: the unsplit sequence's positions of this rank's tokens, the CP attention and the
        positions of its chunks the head scores."""
        return {"position_ids": self.position_ids, "attention": self.attention(),
                "scored_positions": self.scored_positions}

    def attention(self) -> ContextParallelAttention:
        """The CP attention of this micro-batch, built once (every layer reuses it)."""
        length = self.input_ids.shape[1]
        mine = slice(self.rank * length, (self.rank + 1) * length)
        return ContextParallelAttention(self.key_columns[mine], self.key_columns, self.key_documents[:, mine],
                                        self.key_documents, self.group)

    def to(self, device: torch.device | str) -> ContextText:
        """The same chunks on `device` (CPU: itself)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        moved = LanguageText.to(self, device)
        return ContextText(moved.input_ids, moved.labels, moved.position_ids, None,
                           scored_positions=moved.scored_positions, key_columns=to_device(self.key_columns, device),
                           key_documents=to_device(self.key_documents, device), rank=self.rank, size=self.size,
                           group=self.group, every_rank_rows=self.every_rank_rows)


def split_text(text: LanguageText, rank: int, size: int, special_ids: Iterable[int] = (),
               group: dist.ProcessGroup | None = None) -> ContextText:
    """CP rank `rank`'s chunks of `text` (host tensors), with the rows of each special id's embeddings they hold."""
    rows, length = text.input_ids.shape
    documents = None if text.document_ids is None else text.document_ids[0]
    if text.document_ids is not None and rows != 1:
        raise ValueError(f"a packed text has one row, got {rows}")
    columns = split_columns(length, documents, size)
    mine = columns[rank]
    keep, source = mine != PAD, mine.clamp(min=0)
    ids = text.input_ids[:, source].masked_fill(~keep, 0)
    labels = text.labels[:, source].masked_fill(~keep, IGNORE_INDEX)
    positions = text.position_ids if text.position_ids is not None else torch.arange(length).expand(rows, length)
    positions = positions[..., source].masked_fill(~keep, 0)
    every = torch.cat(columns)
    padding = every == PAD
    key_columns = torch.where(padding, length + torch.arange(every.numel()), every)
    whole_documents = text.document_ids if text.document_ids is not None else torch.zeros(1, length, dtype=torch.long)
    key_documents = whole_documents[:, every.clamp(min=0)].masked_fill(padding, PAD)
    every_rank_rows = {token: _every_rank_rows(text.input_ids, columns, token) for token in special_ids}
    return ContextText(ids, labels, positions.contiguous(), None, key_columns=key_columns,
                       key_documents=key_documents, rank=rank, size=size, group=group,
                       every_rank_rows=every_rank_rows)


def chunk_rows(text: LanguageText, size: int, token: int) -> list[torch.Tensor]:
    """Per CP rank of `size`, which rows of `token`'s embeddings of `text` (a micro-batch share, host tensors) its
    chunks hold, in its order: `split_text`'s `every_rank_rows` without the rest of the split."""
    documents = None if text.document_ids is None else text.document_ids[0]
    return _every_rank_rows(text.input_ids, split_columns(text.input_ids.shape[1], documents, size), token)


def _every_rank_rows(ids: torch.Tensor, columns: list[torch.Tensor], token: int) -> list[torch.Tensor]:
    """Per CP rank's `columns`, the rows of `token`'s embeddings (row-major over `ids` [R, T]) they hold."""
    return [_rows_held(ids == token, c.clamp(min=0), c != PAD) for c in columns]


def _rows_held(special: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Which of the row-major special positions of `special` [R, T] the kept columns hold, in the kept order."""
    number = special.flatten().cumsum(0).view_as(special) - 1
    held = special[:, source] & keep
    return number[:, source][held]


class ContextParallelAttention:
    """Local queries over every CP rank's keys and values, all-gathered; a query sees the keys of its document at
    or before its own column of the unsplit row (`context_mask`).

    Two cores, one mask. On CUDA (heads of `FLEX_MIN_HEAD_DIM` or more) `flex_core`: compiled `flex_attention`
    with a block mask built once per micro-batch (the first layer's call; every layer shares this object), so the
    blocks no query of a block sees (other documents, later chunks) are skipped: about the query-key pairs CP1's
    varlen kernel computes, and flex saves only q, k, v, its output and logsumexp for the backward. Elsewhere (the
    CPU, the float64 parity tests; narrow test heads) `masked_core`: SDPA with an explicit mask built per block
    of queries, under `torch.utils.checkpoint`, so what the backward keeps is q and the gathered k, v (O(L + CP·L)
    per rank, as a flash kernel's) and the core is recomputed in the backward (Megatron's core-attention
    recompute). An explicit mask sends SDPA to its math kernel, which would otherwise save the [L, CP·L]
    probabilities per head and layer, more than the split saves."""

    def __init__(self, query_columns: torch.Tensor, key_columns: torch.Tensor, query_documents: torch.Tensor,
                 key_documents: torch.Tensor, group: dist.ProcessGroup | None) -> None:
        """Keep the columns and documents of the local queries [L], [R or 1, L] and of every rank's keys."""
        self.mask_mod = context_mask(query_columns, key_columns, query_documents, key_documents)
        self.rows, self.queries, self.keys = query_documents.shape[0], query_columns.numel(), key_columns.numel()
        self.group = group
        self._block_mask: BlockMask | None = None
        # outside any compiled block's graph (it breaks around the call), as the flex variant: a collective in an
        # autograd.Function is not something to trace. Only where something was compiled (torch.compile imported
        # dynamo when the blocks were wrapped): `torch.compiler.disable` imports dynamo, seconds per process
        self._attend = torch.compiler.disable(self._gathered) if compiler_loaded() else self._gathered

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [R, heads, L, d], k, v [R, kv heads, L, d] of this rank's tokens → [R, heads, L, d]."""
        return self._attend(q, k, v)

    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """K and V gathered in one collective (side by side along the heads, in the dtype the core attends in),
        then the core for q's device."""
        heads = k.shape[1]
        kv = gather_sequence(torch.cat([k, v.to(k.dtype)], dim=1), self.group, attention_dtype(q, k, v))
        k, v = kv[:, :heads], kv[:, heads:]
        if uses_flex(q):
            return self.flex_core(q, k, v)
        return checkpoint(self.masked_core, q, k, v, use_reentrant=False, preserve_rng_state=False)  # no randomness

    def flex_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """`attend` (compiled flex_attention unless given: eager flex on CPU, the tests') over the blocks the mask
        keeps, on q, k, v of one dtype (`attention_dtype`), as the decoder's flex variant."""
        dtype = attention_dtype(q, k, v)
        attend = attend or compiled_flex_attention()
        return attend(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=self.block_mask(q.device), enable_gqa=True)

    def block_mask(self, device: torch.device) -> BlockMask:
        """The micro-batch's block mask on `device`, built on the first call and kept (every layer's)."""
        if self._block_mask is None:
            self._block_mask = build_block_mask(self.mask_mod, self.rows, self.queries, self.keys, device)
        return self._block_mask

    def masked_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of each block of queries over every key, with that block's explicit mask [R or 1, 1, rows, CP·L]."""
        rows = query_block(q, k)
        batch = torch.arange(self.rows, device=q.device)[:, None, None, None]
        keys = torch.arange(self.keys, device=q.device)
        out = []
        for start in range(0, q.shape[2], rows):
            block = torch.arange(start, min(start + rows, q.shape[2]), device=q.device)
            mask = self.mask_mod(batch, 0, block[:, None], keys[None, :]).view(-1, 1, block.numel(), self.keys)
            out.append(F.scaled_dot_product_attention(q[:, :, start:start + rows], k, v, attn_mask=mask,
                                                      enable_gqa=True))
        return torch.cat(out, dim=2)


MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def context_mask(query_columns: torch.Tensor, key_columns: torch.Tensor, query_documents: torch.Tensor,
                 key_documents: torch.Tensor) -> MaskMod:
    """flex's mask_mod (b, h, query index, key index) → whether the local query sees the gathered key: the same
    document, at or before the query's column of the unsplit row (a lookup from local index to global column:
    a rank's queries are two column ranges per sequence). Broadcasting index tensors give the explicit mask.
    Documents of one row [1, L] serve every row and leave `b` unread (the block mask then has one row too)."""
    if query_documents.shape[0] == 1:
        query_document, key_document = query_documents[0], key_documents[0]

        def shared(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (query_columns[q] >= key_columns[kv]) & (query_document[q] == key_document[kv])

        return shared

    def per_row(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (query_columns[q] >= key_columns[kv]) & (query_documents[b, q] == key_documents[b, kv])

    return per_row


FLEX_BLOCK = 128  # flex_attention's default sparse block (queries and keys): the block mask's granularity


def build_block_mask(mask_mod: MaskMod, rows: int, queries: int, keys: int, device: torch.device | str,
                     cells: int = 2**28) -> BlockMask:
    """`create_block_mask` of `mask_mod` over [rows, queries, keys], made a few query blocks at a time, each
    piece's dense mask at most about `cells` booleans: torch's builds the whole [queries, keys] mask at once
    (2**31 booleans and its comparisons' temporaries for a 64k-token row at CP2). The pieces' block tables are
    joined along the query blocks."""
    step = max(1, cells // max(1, rows * keys) // FLEX_BLOCK) * FLEX_BLOCK
    pieces = [create_block_mask(_shifted(mask_mod, start), rows, None, min(step, queries - start), keys,
                                device=device, BLOCK_SIZE=FLEX_BLOCK) for start in range(0, queries, step)]

    def joined(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in pieces], dim=2)  # [rows, 1, query blocks, ...]

    return BlockMask.from_kv_blocks(joined("kv_num_blocks"), joined("kv_indices"), joined("full_kv_num_blocks"),
                                    joined("full_kv_indices"), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(queries, keys))


def _shifted(mask_mod: MaskMod, start: int) -> MaskMod:
    """`mask_mod` for the queries from `start` on (a piece of `build_block_mask`)."""
    def shifted(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mask_mod(b, h, q + start, kv)

    return shifted


def uses_flex(q: torch.Tensor) -> bool:
    """Whether the core runs flex_attention for queries like `q`: on CUDA in any dtype, as the decoder's packed
    rows take flex wherever they do not take flash's varlen kernel (which a CP rank's chunks, seeing other ranks'
    keys, cannot use), and heads wide enough for compiled flex (`FLEX_MIN_HEAD_DIM`)."""
    return q.device.type == "cuda" and q.shape[-1] >= FLEX_MIN_HEAD_DIM


def query_block(q: torch.Tensor, k: torch.Tensor) -> int:
    """Queries per block of the explicit-mask core, so that its transients stay bounded: on CUDA (narrow heads
    only) SDPA's kernels take the mask and materialize no scores, so the block's [rows, CP·L] mask is bounded
    (2**28 booleans, 256 MB; few blocks); elsewhere SDPA's math kernel materializes the block's scores for every
    row and head, so those are (2**24 floats)."""
    rows, heads = q.shape[:2]
    keys = max(k.shape[2], 1)
    if q.device.type == "cuda":
        return max(1, 2**28 // keys)
    return max(1, 2**24 // (keys * rows * heads))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 (the sequence of [R, heads, L, d]) over a group, in `dtype`; backward: reduce-scatter
    in x's own dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None, dtype: torch.dtype) -> torch.Tensor:
        ctx.group, ctx.dtype = group, x.dtype
        x = x.to(dtype).contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        pieces = [p.to(ctx.dtype).contiguous() for p in grad.chunk(dist.get_world_size(ctx.group), dim=2)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=ctx.group)
        return out, None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every CP rank's x [R, heads, L, d] joined along the sequence in rank order (a differentiable all-gather),
    sent in `dtype` (default x's): the cores attend in autocast's dtype, so K and V cross in it, half float32's
    bytes, while their gradients are summed over the ranks in x's dtype, as a cast after the gather would."""
    return _GatherSequence.apply(x, group, dtype or x.dtype)
