"""Per-module grids on real gloo process groups: membership, collectives, creation order, meshes."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.distributed as dist

import mimo.grid
from mimo.config import MimoParallelismConfig
from mimo.grid import (
    GROUP_DIMS,
    MESH_DIMS,
    build_module_grids,
    is_current_rank_in_grid,
    is_pp_first_stage,
    is_pp_last_stage,
)
from mimo.testing import run_distributed

HOMOGENEOUS = {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}}
COLOCATED = {"images": {"data_parallel_size": 4},
             "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2}}
HETEROGENEOUS = {
    "images": {"tensor_model_parallel_size": 1, "data_parallel_size": 2},
    "language": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                 "rank_offset": 2},
    "audio": {"data_parallel_size": 2, "rank_offset": 6},
}
STUB = {"images": {"data_parallel_size": 1, "rank_offset": 1},
        "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 2}}
LAYOUTS = [("homogeneous", HOMOGENEOUS, 4), ("colocated", COLOCATED, 4), ("heterogeneous", HETEROGENEOUS, 8),
           ("stub", STUB, 4)]
PP_LAYOUTS = [  # language PP 1, 2, 4 (embedding groups)
    ("pp1", {"language": {"data_parallel_size": 2}}, 2),
    ("pp2", {"images": {"data_parallel_size": 2},
             "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2}}, 6),
    ("pp4", {"language": {"pipeline_model_parallel_size": 4, "data_parallel_size": 1}}, 4),
]


# -- independent arithmetic (written from DESIGN §3, not from mimo.grid) -------------------------
def coords(rank: int, offset: int, shape: tuple[int, ...]) -> dict[str, int]:
    """(pp, dp, cp, tp) of a rank, tp fastest."""
    pp, dp, cp, tp = shape
    local = rank - offset
    return {"tp": local % tp, "cp": local // tp % cp, "dp": local // (tp * cp) % dp, "pp": local // (tp * cp * dp)}


def expected_group(rank: int, offset: int, shape: tuple[int, ...], dims: tuple[str, ...]) -> list[int]:
    """The ranks that share every coordinate of `rank` outside `dims`, in increasing order."""
    mine = coords(rank, offset, shape)
    span = range(offset, offset + int(torch.tensor(shape).prod()))
    return [r for r in span if all(coords(r, offset, shape)[d] == mine[d] for d in MESH_DIMS if d not in dims)]


def expected_embedding(rank: int, offset: int, shape: tuple[int, ...]) -> tuple[list[int] | None, list[int]]:
    """pos_embd (None if rank is not a first stage) and embd (None if neither first nor last) of a rank."""
    pp = expected_group(rank, offset, shape, ("pp",))
    first, last = pp[0], pp[-1]
    pos = [first] if rank == first else None
    embd = sorted({first, last}) if rank in (first, last) else None
    return pos, embd


def expected_creation_order(layout: dict, world_size: int) -> list[tuple[int, ...]]:
    """Every distinct group in global order: modules, then tp, cp, dp, pp, dp_cp, tp_cp, span, embedding groups."""
    config = MimoParallelismConfig.from_dict(layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.finalize(world_size)
    order: list[tuple[int, ...]] = []
    for name, m in config.module_parallelisms.items():
        for dims in GROUP_DIMS.values():
            for r in m.span:
                g = tuple(expected_group(r, m.rank_offset, m.shape, dims))
                if g not in order:
                    order.append(g)
        if name == "language":
            for r in m.span:
                if coords(r, m.rank_offset, m.shape)["pp"] == 0:
                    pp = expected_group(r, m.rank_offset, m.shape, ("pp",))
                    for g in ((pp[0],), tuple(sorted({pp[0], pp[-1]}))):
                        if g not in order:
                            order.append(g)
    return order


# -- the worker ---------------------------------------------------------------------------------
def check_grids(rank: int, world_size: int, layout: dict) -> dict:
    """Build the grids, check every held group against arithmetic and an all-reduce; return facts."""
    created: list[tuple[int, ...]] = []
    real_new_group = mimo.grid._new_group

    def recording(ranks):
        created.append(tuple(ranks))
        return real_new_group(ranks)

    mimo.grid._new_group = recording
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grids = build_module_grids(MimoParallelismConfig.from_dict(layout))
    mimo.grid._new_group = real_new_group

    held = {}
    for name, grid in grids.items():
        m = grid.config
        if rank not in m.span:
            assert grid.coord is None and grid.mesh is None and not grid.groups
            assert not is_current_rank_in_grid(grid)
            assert all(v is None for v in vars(grid.pg_collection()).values())
            continue
        assert is_current_rank_in_grid(grid)
        c = coords(rank, m.rank_offset, m.shape)
        assert grid.coord == tuple(c[d] for d in MESH_DIMS)
        for gname, dims in GROUP_DIMS.items():
            want = expected_group(rank, m.rank_offset, m.shape, dims)
            assert_group(grid.get_group(gname), want, f"{name}.{gname}")
            assert grid.group_ranks(gname) == want
        if name == "language":
            pos, embd = expected_embedding(rank, m.rank_offset, m.shape)
            assert_group(grid.get_group("pos_embd"), pos, "language.pos_embd")
            assert_group(grid.get_group("embd"), embd, "language.embd")
            assert is_pp_first_stage(grid.get_group("pp")) == (c["pp"] == 0)
            assert is_pp_last_stage(grid.get_group("pp")) == (c["pp"] == m.pipeline_model_parallel_size - 1)
        else:
            assert grid.get_group("embd") is None and grid.get_group("pos_embd") is None
        check_mesh(grid, rank)
        held[name] = {k: dist.get_process_group_ranks(v) for k, v in grid.groups.items()}

    sequences = [None] * world_size
    dist.all_gather_object(sequences, created)
    assert all(s == created for s in sequences), "ranks created groups in different orders"
    return {"created": created, "held": held, "coords": {n: g.coord for n, g in grids.items()}}


def assert_group(group, want: list[int] | None, what: str) -> None:
    """The group has exactly the members `want` (None: this rank holds no such group) and sums right."""
    if want is None:
        assert group is None, f"{what}: rank holds a group it should not"
        return
    assert group is not None, f"{what}: missing group, expected {want}"
    assert dist.get_process_group_ranks(group) == want, f"{what}: {dist.get_process_group_ranks(group)} != {want}"
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t, group=group)
    assert t.item() == sum(r + 1 for r in want), f"{what}: all-reduce gave {t.item()}"


def check_mesh(grid, rank: int) -> None:
    """The module's DeviceMesh has the (pp, dp, cp, tp) shape, this rank's coordinate and the right dim groups."""
    mesh = grid.mesh
    assert mesh.mesh_dim_names == MESH_DIMS
    assert tuple(mesh.shape) == grid.shape
    assert tuple(mesh.get_coordinate()) == grid.coord
    assert mesh.mesh.flatten().tolist() == list(grid.span)
    for d in MESH_DIMS:
        assert dist.get_process_group_ranks(mesh[d].get_group()) == grid.group_ranks(d)
        assert mesh.get_local_rank(d) == getattr(grid.coord, d)


# -- tests ---------------------------------------------------------------------------------------
ALL_LAYOUTS = LAYOUTS + PP_LAYOUTS


@pytest.mark.parametrize(("kind", "layout", "world_size"), ALL_LAYOUTS, ids=[x[0] for x in ALL_LAYOUTS])
def test_groups_match_arithmetic(kind, layout, world_size):
    results = run_distributed(check_grids, world_size, layout)
    assert results[0]["created"] == expected_creation_order(layout, world_size)
    config = MimoParallelismConfig.from_dict(layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.finalize(world_size)
    for rank, res in enumerate(results):
        assert sorted(res["held"]) == config.modules_on_rank(rank)
    if kind == "stub":
        assert results[0]["held"] == {} and results[0]["coords"] == {"images": None, "language": None}


def test_embedding_groups_pp4():
    results = run_distributed(check_grids, 4, PP_LAYOUTS[2][1])
    held = [r["held"]["language"] for r in results]
    assert [h.get("pos_embd") for h in held] == [[0], None, None, None]
    assert [h.get("embd") for h in held] == [[0, 3], None, None, [0, 3]]
    assert held[1]["pp"] == [0, 1, 2, 3]


def test_embedding_groups_pp1_single_rank():
    results = run_distributed(check_grids, 2, PP_LAYOUTS[0][1])
    assert [r["held"]["language"]["embd"] for r in results] == [[0], [1]]
    assert [r["held"]["language"]["pos_embd"] for r in results] == [[0], [1]]


def test_rank_groups_arithmetic_without_processes():
    config = MimoParallelismConfig.from_dict(HETEROGENEOUS).finalize(8)
    grid = mimo.grid.ModuleGrid("language", config.get_parallelism("language"), rank=0)
    assert grid.rank_groups("tp") == [[2, 3], [4, 5]]
    assert grid.rank_groups("pp") == [[2, 4], [3, 5]]
    assert grid.rank_groups(("pp", "tp")) == [[2, 3, 4, 5]]
    assert grid.embedding_rank_groups() == [([2], [2, 4]), ([3], [3, 5])]
    assert grid.coordinates(5) == (1, 0, 0, 1)
    assert grid.coordinates(0) is None
    assert grid.group_ranks("dp", rank=4) == [4]
    with pytest.raises(ValueError, match=r"unknown mesh dims \['ep'\]"):
        grid.rank_groups(("ep",))
    for r, (p, d, c, t) in zip(grid.span, itertools.product(range(2), range(1), range(1), range(2)), strict=True):
        assert grid.coordinates(r) == (p, d, c, t)


def test_pipeline_pairs_wrap_around_with_virtual_stages():
    """The pairs the step opens before its first message (`P2PGroups.warm_up`): neighbours, and under interleaved
    1F1B the last stage's rank with the first (rank PP-1's chunk c feeds rank 0's chunk c + 1) on the seam's
    groups."""
    from mimo.config import ModuleParallelismConfig

    def grid(vpp: int) -> mimo.grid.ModuleGrid:
        layout = ModuleParallelismConfig(pipeline_model_parallel_size=4, data_parallel_size=2,
                                         virtual_pipeline_model_parallel_size=vpp)
        return mimo.grid.ModuleGrid("language", layout, rank=0)

    for vpp in (1, 2):
        assert mimo.grid.pipeline_pairs(grid(vpp)) == [(0, 2), (2, 4), (4, 6), (1, 3), (3, 5), (5, 7)]
    assert mimo.grid.seam_pairs(grid(1)) == []
    assert mimo.grid.seam_pairs(grid(2)) == [(6, 0), (7, 1)]
