"""The multi-process harness itself: results by rank, every traceback, and a timeout instead of a hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from mimo.testing import DistributedTestError, run_distributed


def all_reduce_rank(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item() * scale


def fail_on_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def hang_on_one(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(60)
    return rank


def die_on_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(3)
    return rank


def test_results_come_back_in_rank_order():
    assert run_distributed(all_reduce_rank, 3, 2.0) == [6.0, 6.0, 6.0]


def test_failure_shows_the_failing_rank_traceback():
    with pytest.raises(DistributedTestError) as err:
        run_distributed(fail_on_one, 2)
    assert "rank 1 (error)" in str(err.value)
    assert "ValueError: rank one is broken" in str(err.value)


def test_timeout_names_the_ranks_that_did_not_finish():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[1\] did not finish within 8 s"):
        run_distributed(hang_on_one, 2, timeout_s=8)  # room for a slow start on a busy machine
    assert time.monotonic() - t0 < 30  # killed, not waited for (a bound on the harness, not a speed claim)


def test_a_rank_that_dies_silently_is_reported():
    with pytest.raises(DistributedTestError, match=r"rank 0 \(died\) ---\nprocess exited with code 3"):
        run_distributed(die_on_zero, 2)


def test_world_size_is_bounded():
    with pytest.raises(ValueError, match="1 to 8 processes"):
        run_distributed(all_reduce_rank, 9, 1.0)
