"""Group arithmetic and creation at 4096 ranks, as single ranks of PyTorch's fake backend (no processes)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import mimo.grid
from mimo.config import MimoParallelismConfig
from mimo.grid import GROUP_DIMS, build_module_grids
from mimo.testing import fake_world
from tests.test_grid import expected_embedding, expected_group

WORLD = 4096
LAYOUT = {  # images DP 256 (0-255), audio DP 256 (256-511), language TP 8 x PP 7 x DP 64 (512-4095)
    "images": {"data_parallel_size": 256},
    "audio": {"data_parallel_size": 256, "rank_offset": 256},
    "language": {"tensor_model_parallel_size": 8, "pipeline_model_parallel_size": 7, "data_parallel_size": 64,
                 "rank_offset": 512},
}
# Distinct rank sets, counted by hand: images 256 singletons + 1 dp/span group = 257; audio 257;
# language 448 tp + 3584 singletons + 56 dp + 512 pp + 1 span + 512 embd pairs = 5113.
DISTINCT_GROUPS = 257 + 257 + 5113


def build_as(rank: int) -> tuple[dict, int]:
    """Build every grid as `rank` of the fake world; return the grids' held ranks and the groups created."""
    created = []
    real = mimo.grid._new_group

    def counting(ranks):
        created.append(tuple(ranks))
        return real(ranks)

    mimo.grid._new_group = counting
    try:
        with fake_world(rank, WORLD):
            grids = build_module_grids(MimoParallelismConfig.from_dict(LAYOUT))
            held = {n: {k: dist.get_process_group_ranks(v) for k, v in g.groups.items()} for n, g in grids.items()}
    finally:
        mimo.grid._new_group = real
    return held, len(created), created


@pytest.mark.parametrize("rank", [0, 255, 256, 511, 512, 519, 1000, 3584, 4095])
def test_membership_at_4096_ranks(rank):
    held, n_created, created = build_as(rank)
    assert n_created == DISTINCT_GROUPS
    assert len(set(created)) == n_created, "a rank set was created twice"
    config = MimoParallelismConfig.from_dict(LAYOUT).finalize(WORLD)
    (name,) = config.modules_on_rank(rank)
    assert set(held) == {"images", "audio", "language"}
    assert [n for n, h in held.items() if h] == [name]
    m = config.get_parallelism(name)
    for gname, dims in GROUP_DIMS.items():
        assert held[name][gname] == expected_group(rank, m.rank_offset, m.shape, dims), gname
    if name == "language":
        pos, embd = expected_embedding(rank, m.rank_offset, m.shape)
        assert held[name].get("pos_embd") == pos
        assert held[name].get("embd") == embd


def test_creation_order_is_rank_independent():
    orders = [build_as(r)[2] for r in (0, 2047, 4095)]
    assert orders[0] == orders[1] == orders[2]
