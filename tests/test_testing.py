"""The multi-process harness itself: results by rank, every traceback, and a timeout instead of a hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from mimo.testing import DistributedTestError, assert_matches_reference, run_distributed


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


def test_reference_comparison_is_relative_with_one_floor_for_zero_gradients():
    """A key-bias-like tensor (zero in the reference) may hold rounding noise; a wrong real value may not."""
    ref = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64), "k_bias": torch.zeros(2, dtype=torch.float64)}
    noise = {"w": ref["w"] * (1 + 1e-12), "k_bias": torch.full((2,), 1.3e-14, dtype=torch.float64)}  # row 9's
    assert assert_matches_reference(noise, ref, "noise") < 1e-8
    with pytest.raises(AssertionError, match=r"off: w differs from the reference by 5.0e-07"):
        assert_matches_reference({"w": ref["w"] + torch.tensor([0.0, 1e-6])}, ref, "off")
    with pytest.raises(AssertionError, match="k_bias differs"):  # 1e-10 against a floor of 2e-4: too large
        assert_matches_reference({"k_bias": torch.full((2,), 1e-10, dtype=torch.float64)}, ref, "bias")
