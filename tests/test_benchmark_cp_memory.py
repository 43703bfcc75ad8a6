"""benchmarks/cp_memory.py: its measurement runs on gloo and shows the split (CP 2 saves about half of CP 1's
activation bytes per rank, for the same loss); its table prints. The 2k-32k figures are in benchmarks/RESULTS.md."""

from __future__ import annotations

from mimo.testing import run_distributed
from tests.scripts import load_script


def saved(rank: int, world_size: int, length: int) -> dict:
    """The script's per-rank measurement (loaded here, so that workers import it by this module's path)."""
    return load_script("cp_memory", "cp_memory").saved_bytes(rank, world_size, length)


def test_cp2_saves_about_half_of_cp1_per_rank_for_the_same_loss():
    one = run_distributed(saved, 1, 512)[0]
    two = run_distributed(saved, 2, 512)
    assert max(r["bytes"] for r in two) <= 0.55 * one["bytes"]
    assert [r["tokens"] for r in two] == [256, 256]
    assert abs(sum(r["loss_sum"] for r in two) - one["loss_sum"]) <= 1e-4 * abs(one["loss_sum"])
    script = load_script("cp_memory", "cp_memory")
    records = [{"cp": 1, "length": 512, "bytes_per_rank": one["bytes"], "tokens_per_rank": 512, "seconds": 0.0},
               {"cp": 2, "length": 512, "bytes_per_rank": max(r["bytes"] for r in two), "tokens_per_rank": 256,
                "seconds": 0.0}]
    assert "| 512 | 2 | 256 |" in script.table(records)
