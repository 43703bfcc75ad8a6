"""Time `build_module_grids` for a 4096-rank, three-module layout, as sampled ranks of a fake world.

    python benchmarks/grid_build.py
"""

from __future__ import annotations

import time

import mimo.grid
from mimo.config import MimoParallelismConfig
from mimo.grid import build_module_grids
from mimo.testing import fake_world

WORLD = 4096
LAYOUT = {
    "images": {"data_parallel_size": 256},
    "audio": {"data_parallel_size": 256, "rank_offset": 256},
    "language": {"tensor_model_parallel_size": 8, "pipeline_model_parallel_size": 7, "data_parallel_size": 64,
                 "rank_offset": 512},
}


def main() -> None:
    """Print, per sampled rank, the groups created, the groups held and the build time."""
    real = mimo.grid._new_group
    for rank in (0, 300, 512, 2047, 4095):
        calls = 0

        def counting(ranks):
            nonlocal calls
            calls += 1
            return real(ranks)

        mimo.grid._new_group = counting
        with fake_world(rank, WORLD):
            t0 = time.perf_counter()
            grids = build_module_grids(MimoParallelismConfig.from_dict(LAYOUT))
            dt = time.perf_counter() - t0
            held = sum(len(g.groups) for g in grids.values())
        mimo.grid._new_group = real
        print(f"rank {rank:5d}: {calls} groups created, {held} handles held, built in {dt * 1000:.0f} ms")


if __name__ == "__main__":
    main()
