"""The bridge on real gloo groups: exact rows forward and the single-process gradient back, for every layout.

A synthetic edge: the src "encoder" is x @ W (same seeded W everywhere), `T` rows per item, 0, 1 or 3 items per
sample; the dst "language model" scores loss = Σ ((rows ⊙ C)²) over its replica's rows on every first-stage
rank (so every dst TP rank holds the same leaf.grad, as real TP gives). The loss is quadratic so that a
gradient delivered to the wrong rows changes W.grad. Reference: the same loss over the whole micro-batch in
one process.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from mimo.bridge import Bridge, bridge_kind, make_bridge, row_offsets, sample_overlaps
from mimo.config import MimoParallelismConfig
from mimo.grid import ModuleGrid, build_module_grids
from mimo.testing import run_distributed

H, F, T, B = 4, 3, 2, 4  # hidden size, item features, rows per item, micro-batch size
DTYPE = torch.float64
ITEMS = [[1, 0, 3, 1], [0, 0, 3, 1], [3, 1, 0, 0]]  # items per sample, per micro-batch (a replica may get none)
SEEDS = {"images": 1, "audio": 2}


def lang(**kw: int) -> dict[str, int]:
    """A language layout (DP 1 unless given)."""
    return {"data_parallel_size": 1, **kw}


# (id, layout, sources, world size, kind)
CASES = [
    ("one_to_one", {"images": {"data_parallel_size": 1}, "language": lang(rank_offset=1)}, ["images"], 2,
     "heterogeneous"),
    ("fan_in", {"images": {"data_parallel_size": 2}, "language": lang(tensor_model_parallel_size=2, rank_offset=2)},
     ["images"], 4, "heterogeneous"),
    ("fan_out", {"images": {"data_parallel_size": 1}, "language": lang(data_parallel_size=2, rank_offset=1)},
     ["images"], 3, "heterogeneous"),
    ("src_tp_dst_pp", {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 1},
                       "language": lang(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, rank_offset=2)},
     ["images"], 6, "heterogeneous"),
    ("two_edges", {"images": {"data_parallel_size": 2}, "audio": {"data_parallel_size": 1, "rank_offset": 2},
                   "language": lang(tensor_model_parallel_size=2, rank_offset=3)}, ["images", "audio"], 5,
     "heterogeneous"),
    ("stub_rank", {"images": {"data_parallel_size": 1, "rank_offset": 1},
                   "language": lang(tensor_model_parallel_size=2, rank_offset=2)}, ["images"], 4, "heterogeneous"),
    ("colocated", {"images": {"data_parallel_size": 4},
                   "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2}}, ["images"], 4,
     "colocated"),
    ("colocated_pp", {"images": {"data_parallel_size": 4},
                      "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}}, ["images"], 4,
     "colocated"),
    ("homogeneous", {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}},
     ["images"], 4, "homogeneous"),
]


# -- the synthetic edge (the same arithmetic in the workers and the reference) -------------------------
def weight(src: str) -> Tensor:
    """The encoder's W [F, T·H], seeded per source."""
    return torch.randn(F, T * H, generator=torch.Generator().manual_seed(SEEDS[src]), dtype=DTYPE)


def scale(src: str) -> Tensor:
    """The language model's C [H], seeded per source."""
    return torch.randn(H, generator=torch.Generator().manual_seed(10 + SEEDS[src]), dtype=DTYPE)


def items_per_sample(src: str, m: int) -> list[int]:
    """Items of each sample of micro-batch m (audio reversed, so the two edges differ)."""
    return ITEMS[m] if src == "images" else ITEMS[m][::-1]


def samples(src: str, m: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(item features, rows per sample) of samples [start, stop) of micro-batch m."""
    counts = torch.tensor(items_per_sample(src, m))
    feats = torch.randn(int(counts.sum()), F, generator=torch.Generator().manual_seed(100 * SEEDS[src] + m),
                        dtype=DTYPE)
    first = row_offsets(counts)
    return feats[first[start]:first[stop]], counts[start:stop] * T


def encode(w: Tensor, feats: Tensor) -> Tensor:
    """Each item's T rows, in sample order: [items·T, H]."""
    return (feats @ w).reshape(-1, H)


def loss_of(rows: Tensor, src: str) -> Tensor:
    """The dst replica's loss: quadratic, so each row's gradient depends on the row."""
    return ((rows * scale(src)) ** 2).sum()


def reference_grad(src: str) -> Tensor:
    """W.grad of the loss over every sample of every micro-batch, in one process."""
    w = weight(src).requires_grad_()
    for m in range(len(ITEMS)):
        loss_of(encode(w, samples(src, m, 0, B)[0]), src).backward()
    return w.grad


# -- the distributed run --------------------------------------------------------------------------
def replica_samples(grid: ModuleGrid) -> tuple[int, int]:
    """[start, stop) of the samples this rank's DP replica of `grid` owns."""
    per = B // grid.size("dp")
    return grid.coord.dp * per, (grid.coord.dp + 1) * per


def sender_inputs(src: str, m: int, grid: ModuleGrid, w: Tensor) -> tuple[Tensor, Tensor]:
    """This src replica's embeddings (with autograd history into w) and counts."""
    feats, counts = samples(src, m, *replica_samples(grid))
    return encode(w, feats), counts


def check_received(src: str, m: int, dst: ModuleGrid, bridge: Bridge, rows: Tensor, counts: Tensor) -> None:
    """The receiver holds exactly its dst replica's reference rows and counts."""
    feats, ref_counts = samples(src, m, *replica_samples(dst))
    assert torch.equal(counts, ref_counts), (src, m, counts, ref_counts)
    torch.testing.assert_close(rows.detach(), encode(weight(src), feats), rtol=1e-14, atol=1e-15)
    if bridge.kind != "homogeneous":
        assert rows.is_leaf and rows.requires_grad


def finalized(layout: dict, world: int) -> MimoParallelismConfig:
    """The validated config (the leading-stub-rank warning is expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MimoParallelismConfig.from_dict(layout).finalize(world)


def run_edges(rank: int, world_size: int, layout: dict, srcs: list[str], known_counts: bool = False) -> dict:
    """Heterogeneous senders run ahead (every forward, then every backward); the rest go in lockstep. With
    `known_counts`, colocated senders pass the whole micro-batch's counts, and gathering them is an error."""
    grids = build_module_grids(finalized(layout, world_size))
    bridges = {s: make_bridge(grids[s], grids["language"], B, H, DTYPE) for s in srcs}
    if known_counts:
        for br in bridges.values():
            br._colocated_counts = _no_gather
    weights = {s: weight(s).requires_grad_() for s in srcs}
    ahead = [s for s, br in bridges.items() if br.kind == "heterogeneous" and br.is_sender]
    for s in ahead:
        for m in range(len(ITEMS)):
            assert bridges[s].forward(m, *sender_inputs(s, m, grids[s], weights[s])) is None
    received = dict.fromkeys(srcs, 0)
    for m in range(len(ITEMS)):
        leaves = {}
        for s in (s for s in srcs if s not in ahead):
            inputs = sender_inputs(s, m, grids[s], weights[s]) if bridges[s].is_sender else ()
            if known_counts and inputs:
                inputs = (*inputs, samples(s, m, 0, B)[1])
            out = bridges[s].forward(m, *inputs)
            if out is not None:
                check_received(s, m, grids["language"], bridges[s], *out)
                leaves[s], received[s] = out[0], received[s] + 1
        if leaves:
            sum(loss_of(rows, s) for s, rows in leaves.items()).backward()
        for s in (s for s in srcs if s not in ahead):
            leaf = leaves.get(s)
            bridges[s].backward(m, leaf.grad if leaf is not None and leaf.is_leaf else None)
    for s in ahead:
        for m in range(len(ITEMS)):
            bridges[s].backward(m)
    for br in bridges.values():
        br.wait()
    return {"kind": {s: br.kind for s, br in bridges.items()},
            "roles": {s: (br.is_sender, br.is_receiver) for s, br in bridges.items()},
            "received": received,
            "grads": {s: (grids[s].coord.dp, grids[s].coord.tp, weights[s].grad) for s in srcs if grids[s].coord}}


def _no_gather(counts: Tensor) -> Tensor:
    raise AssertionError("the counts were all-gathered although the caller passed them")


COLOCATED = [c for c in CASES if c[4] == "colocated"]


@pytest.mark.parametrize("layout, srcs, world, kind", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bridge_delivers_rows_and_single_process_gradient(layout: dict, srcs: list[str], world: int, kind: str):
    """Every receiver holds its replica's exact rows; Σ over src replicas of W.grad is the reference."""
    check_edges(layout, srcs, world, kind, known_counts=False)


@pytest.mark.parametrize("layout, srcs, world, kind", [c[1:] for c in COLOCATED], ids=[c[0] for c in COLOCATED])
def test_colocated_bridge_with_the_microbatch_counts_given_needs_no_gather(layout, srcs, world, kind):
    """What the training step does (every rank holds the global batch): the same rows and gradients."""
    check_edges(layout, srcs, world, kind, known_counts=True)


def check_edges(layout: dict, srcs: list[str], world: int, kind: str, known_counts: bool) -> None:
    results = run_distributed(run_edges, world, layout, srcs, known_counts)
    cfg = finalized(layout, world)
    lang = cfg.get_parallelism("language")
    first_stage = range(lang.rank_offset, lang.rank_offset + lang.tensor_model_parallel_size * lang.data_parallel_size)
    for rank, r in enumerate(results):
        for s in srcs:
            assert r["kind"][s] == kind
            assert r["roles"][s] == (rank in cfg.get_parallelism(s).span, rank in first_stage), (rank, s)
            assert r["received"][s] == (len(ITEMS) if rank in first_stage else 0), (rank, s)
    for s in srcs:
        grads = [r["grads"][s] for r in results if s in r["grads"]]
        leaders = {dp: g for dp, tp, g in grads if tp == 0}
        torch.testing.assert_close(sum(leaders.values()), reference_grad(s), rtol=1e-12, atol=0)
        for dp, _, g in grads:  # every TP rank of a replica ran the same backward
            torch.testing.assert_close(g, leaders[dp], rtol=1e-13, atol=0)


# -- rank arithmetic and errors (one process, no communication) ---------------------------------------
def grids_on(layout: dict, world: int, rank: int) -> dict[str, ModuleGrid]:
    """The grids as seen by `rank`, without process groups (arithmetic only)."""
    cfg = finalized(layout, world)
    return {n: ModuleGrid(n, cfg.get_parallelism(n), rank=rank) for n in cfg.module_names}


def bridge_on(case: str, rank: int, micro_batch_size: int = B) -> Bridge:
    """The images -> language bridge of CASES[case] on `rank`."""
    _, layout, _, world, _ = next(c for c in CASES if c[0] == case)
    grids = grids_on(layout, world, rank)
    return make_bridge(grids["images"], grids["language"], micro_batch_size, H, DTYPE)


def test_sample_overlaps_fan_in_fan_out_and_one_to_one():
    assert sample_overlaps(0, 2, 4) == [(0, 0, 2)]  # fan-in, src side
    assert sample_overlaps(1, 2, 4) == [(0, 0, 2)]
    assert sample_overlaps(0, 4, 2) == [(0, 0, 2), (1, 2, 4)]  # fan-in, dst side
    assert sample_overlaps(1, 4, 1) == [(4, 0, 1), (5, 1, 2), (6, 2, 3), (7, 3, 4)]  # fan-out 4
    assert sample_overlaps(2, 3, 3) == [(2, 0, 3)]


def test_kinds_follow_the_grids():
    for case, _, _, world, kind in CASES:
        grids = grids_on(next(c[1] for c in CASES if c[0] == case), world, 0)
        assert bridge_kind(grids["images"], grids["language"]) == kind, case
        bridge = make_bridge(grids["images"], grids["language"], B, H, DTYPE)
        assert isinstance(bridge, Bridge) and bridge.kind == kind, case
        assert bridge.encodes_inside_language_forward == (kind == "homogeneous"), case


@pytest.mark.parametrize("counts, rows, match", [
    ([2, 4, 0], 6, r"bridge images -> language, micro-batch 1: tokens_per_sample .* expected shape \(2,\), "
                   r"got \(3,\)"),
    ([2, 4], 5, r"bridge images -> language, micro-batch 1: embeddings .* expected \(6, 4\), got \(5, 4\)"),
    ([2, -1], 1, r"micro-batch 1: tokens_per_sample must be >= 0"),
])
def test_sender_inputs_are_checked(counts: list[int], rows: int, match: str):
    bridge = bridge_on("fan_in", rank=0)
    with pytest.raises(ValueError, match=match):
        bridge.forward(1, torch.zeros(rows, H, dtype=DTYPE), torch.tensor(counts))


def test_microbatch_counts_must_agree_with_the_replicas_own():
    bridge = bridge_on("colocated", rank=1)  # images replica 1 of 4: sample 1 of the micro-batch
    with pytest.raises(ValueError, match=r"micro-batch 0: microbatch_tokens must hold the counts of all 4 samples, "
                                         r"with this 'images' replica's tokens_per_sample \[2\] at \[1, 2\); "
                                         r"got \[0, 4, 2, 2\]"):
        bridge.forward(0, torch.zeros(2, H, dtype=DTYPE), torch.tensor([2]), torch.tensor([0, 4, 2, 2]))


def test_sender_must_pass_inputs_of_its_dtype_and_width():
    bridge = bridge_on("fan_in", rank=0)
    with pytest.raises(ValueError, match="must pass both embeddings and tokens_per_sample"):
        bridge.forward(0)
    with pytest.raises(ValueError, match=r"expected \(2, 4\), got \(2, 5\)"):
        bridge.forward(0, torch.zeros(2, H + 1, dtype=DTYPE), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="embeddings must be torch.float64, got torch.float32"):
        bridge.forward(0, torch.zeros(2, H), torch.tensor([2, 0]))


def test_ranks_off_the_edge_reject_data():
    receiver = bridge_on("fan_in", rank=2)
    with pytest.raises(ValueError, match="rank 2 does not hold 'images'"):
        receiver.forward(0, torch.zeros(0, H, dtype=DTYPE), torch.tensor([0, 0]))
    stage1 = bridge_on("src_tp_dst_pp", rank=4)
    assert not stage1.is_sender and not stage1.is_receiver
    with pytest.raises(ValueError, match="rank 4 is not a receiver"):
        stage1.backward(0, torch.zeros(0, H, dtype=DTYPE))


@pytest.mark.parametrize("language", [{"data_parallel_size": 2}, lang(tensor_model_parallel_size=2)],
                         ids=["homogeneous", "colocated"])
def test_stub_rank_is_off_every_edge(language: dict):
    layout = {"images": {"data_parallel_size": 2, "rank_offset": 1}, "language": {**language, "rank_offset": 1}}
    grids = grids_on(layout, 3, rank=0)
    bridge = make_bridge(grids["images"], grids["language"], B, H, DTYPE)
    assert not bridge.is_sender and not bridge.is_receiver
    assert bridge.forward(0) is None
    bridge.backward(0)
    bridge.wait()


def test_micro_batch_order_is_checked():
    bridge = bridge_on("src_tp_dst_pp", rank=1)  # a src TP follower: forward keeps its inputs, sends nothing
    with pytest.raises(RuntimeError, match="micro-batch 0: backward without forward"):
        bridge.backward(0)
    bridge.forward(0, torch.zeros(2, H, dtype=DTYPE), torch.tensor([2, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="micro-batch 0: forward was already called"):
        bridge.forward(0, torch.zeros(2, H, dtype=DTYPE), torch.tensor([2, 0, 0, 0]))


def test_micro_batch_must_split_over_both_sides():
    with pytest.raises(ValueError, match="micro_batch_size 3 must be a positive multiple of 'images' "
                                         "data_parallel_size 2"):
        bridge_on("fan_in", rank=0, micro_batch_size=3)
