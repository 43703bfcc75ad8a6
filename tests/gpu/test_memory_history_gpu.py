"""`log.memory_snapshot` on one GPU (skipped without one): `mimo train` records the CUDA allocator from its start
and, after the asked step, writes torch's snapshot and the peak's holders, which name mimo's own lines. Compiled
and recomputed blocks: recording the stacks of frees crashes those on torch 2.11 (pytorch/pytorch#179536)."""

from __future__ import annotations

from tests.test_train_cli import mimo, write_config

ONE_RANK = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}


def test_the_snapshot_after_a_step_names_who_held_the_peak(tmp_path):
    train = {"steps": 3, "dtype": "bfloat16", "compile": True, "recompute_granularity": "full"}
    path, run_dir = write_config(tmp_path, parallelism=ONE_RANK, train=train,
                                 checkpoint={"interval": 0, "final": False}, log={"memory_snapshot": 2},
                                 eval={"enabled": False})
    done = mimo("train", str(path), "--quiet", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory snapshot after step 2" in done.stdout
    assert (run_dir / "memory" / "rank0.pickle").stat().st_size > 0  # torch's snapshot, for memory_viz
    lines = (run_dir / "memory" / "rank0.txt").read_text().splitlines()
    assert lines[0] == "GPU memory of rank 0 after step 2, recorded from the run's start"
    assert lines[1].startswith("peak ") and float(lines[1].split()[1]) > 0
    holders = [line.split("blocks  ", 1)[1] for line in lines[2:]]
    assert any("/mimo/" in h for h in holders), holders  # mimo's own lines, not torch's
    assert "(allocated before the recording)" not in holders[:1], "recording starts before the model is built"
