"""The context-parallel attention core's two paths agree (issue 30's flex core): in process, no world needed.

`ContextParallelAttention.flex_core` (CUDA: compiled flex_attention over a block mask) against `masked_core` (the
explicit-mask SDPA the float64 CP parity tests run), for a rank's chunks of a CP2 / CP4 split with the gathered
keys made locally. flex_attention has no CPU backward and its eager CPU path applies the mask_mod to every score
(it reads no block of the block mask), so here: the forward in float64 through eager flex (the mask_mod), and the
block mask built in pieces against torch's `create_block_mask` built at once (which blocks are skipped, kept
partial, kept full). The gradients and the compiled kernel, which does skip blocks, are checked on a GPU by
`tests/test_context_parallel_core_cuda.py`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from mimo.context_parallel import ContextParallelAttention, build_block_mask, split_text, uses_flex
from mimo.data.packing import LanguageText

DOCUMENTS = (300, 3, 517, 200)  # packed: one document shorter than 2·CP chunks, every one padded to 2·CP


def packed_text() -> LanguageText:
    """One packed row of four documents."""
    sizes = torch.tensor(DOCUMENTS)
    ids = torch.ones(1, int(sizes.sum()), dtype=torch.long)
    return LanguageText(ids, ids, None, torch.repeat_interleave(torch.arange(len(DOCUMENTS)), sizes).unsqueeze(0))


def padded_text() -> LanguageText:
    """Two padded rows of 517 (not a multiple of 2·CP): their split shares one row of documents."""
    ids = torch.ones(2, 517, dtype=torch.long)
    return LanguageText(ids, ids, None, None)


def attention_on(columns: torch.Tensor, documents: torch.Tensor, own: slice,
                 device: str) -> ContextParallelAttention:
    """The attention of the queries at `own` of the keys' `columns` and `documents`, on `device` (no group: the
    cores never communicate)."""
    columns, documents = columns.to(device), documents.to(device)
    return ContextParallelAttention(columns[own], columns, documents[:, own], documents, None)


def rank_attention(text: LanguageText, rank: int, cp: int,
                   device: str = "cpu") -> tuple[ContextParallelAttention, int]:
    """CP rank `rank`'s attention over every rank's keys, and its L."""
    mine = split_text(text, rank, cp)
    return mine.to(device).attention(), mine.input_ids.shape[1]


def per_row_attention(device: str) -> tuple[ContextParallelAttention, int]:
    """Two rows with documents of their own (row 0 one document, row 1 cut at column 200) on one CP2 split:
    the mask_mod reads each row's documents."""
    mine = split_text(padded_text(), 1, 2)
    length = mine.input_ids.shape[1]
    columns = mine.key_columns
    second = torch.where(columns < 200, 0, 1).masked_fill(mine.key_documents[0] < 0, -1)
    documents = torch.stack([mine.key_documents[0], second])
    return attention_on(columns, documents, slice(length, 2 * length), device), length


def layouts(device: str = "cpu"):
    """(name, attention on `device`, L, rows) of every case."""
    for cp in (2, 4):
        for rank in (0, cp - 1):
            yield f"packed cp{cp} rank {rank}", *rank_attention(packed_text(), rank, cp, device), 1
            yield f"padded cp{cp} rank {rank}", *rank_attention(padded_text(), rank, cp, device), 2
    yield "per-row documents", *per_row_attention(device), 2


def qkv(rows: int, length: int, keys: int) -> tuple[torch.Tensor, ...]:
    """float64 q [rows, 4, L, 16] and grouped-query k, v [rows, 2, keys, 16]."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, h, n, 16, generator=gen, dtype=torch.float64)
                 for h, n in ((4, length), (2, keys), (2, keys)))


def test_flex_core_equals_the_masked_core_forward_in_float64():
    """The mask_mod is the explicit mask: eager flex over it equals the SDPA core to 1e-10 in every layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        for name, attention, length, rows in layouts():
            q, k, v = qkv(rows, length, attention.keys)
            want = attention.masked_core(q, k, v)
            got = attention.flex_core(q, k, v, attend=flex_attention)
            assert got.dtype == torch.float64
            err = float((got - want).abs().max())
            assert err <= 1e-10, f"{name}: flex core differs from the masked core by {err:.1e}"


@pytest.mark.parametrize("cells", [2**28, 128 * 1024])  # one piece; pieces of one query block
def test_block_mask_in_pieces_is_torchs_built_at_once(cells):
    """The block tables built a few query blocks at a time equal `create_block_mask`'s built at once: which blocks
    are skipped, which kept whole (no mask_mod) and which kept partial, for queries and keys."""
    for name, attention, length, _rows in layouts():
        got = build_block_mask(attention.mask_mod, attention.rows, length, attention.keys, "cpu", cells=cells)
        want = create_block_mask(attention.mask_mod, attention.rows, None, length, attention.keys, device="cpu")
        assert got.shape == want.shape and got.BLOCK_SIZE == want.BLOCK_SIZE, name
        for part in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(got, part), getattr(want, part)), (name, part)
        assert torch.equal(got.to_dense(), want.to_dense()), name


def test_a_cp2_rank_keeps_only_the_blocks_its_chunks_see():
    """Four documents of 1024 at CP2: chunks of 256 (two blocks of 128). Per document, rank 0's chunk 0 sees its
    own chunk causally (3 blocks) and chunk 3 all of chunks 0-2 and itself causally (12 + 3); rank 1's chunk 1
    sees chunk 0 and itself (4 + 3), chunk 2 chunks 0-1 and itself (8 + 3): 18 of 128 blocks per document on
    either rank (the dense-mask core computes all 512 of the [16, 32] blocks)."""
    sizes = torch.full((4,), 1024)
    ids = torch.ones(1, 4096, dtype=torch.long)
    text = LanguageText(ids, ids, None, torch.repeat_interleave(torch.arange(4), sizes).unsqueeze(0))
    for rank in (0, 1):
        attention, _ = rank_attention(text, rank, 2)
        blocks = attention.block_mask("cpu").to_dense()
        assert blocks.shape == (1, 1, 16, 32) and int(blocks.sum()) == 4 * 18, (rank, int(blocks.sum()))


def test_block_mask_is_built_once_per_micro_batch():
    """Every layer's call reuses the first call's block mask."""
    attention, _ = rank_attention(packed_text(), 1, 2)
    assert attention.block_mask("cpu") is attention.block_mask("cpu")


def test_the_cpu_keeps_the_masked_core():
    """The float64 parity tests' path (the CUDA file checks that narrow heads keep it there too)."""
    assert not uses_flex(torch.zeros(1, 1, 4, 128))

