"""`mimo train` on two GPUs (skipped without them): heterogeneous, checkpoint, resume on a colocated layout.

float64, so that a change of layout changes nothing but the order of float64 sums: the resumed run's losses
must equal an uninterrupted heterogeneous run's to 1e-9 relative (float64 sums differ by ~1e-16).
"""

from __future__ import annotations

from tests.test_train_cli import mimo, steps_and_losses, write_config

HETEROGENEOUS = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}
COLOCATED = {"images": {"data_parallel_size": 2},
             "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 0}}


def _train(tmp_path, name: str, layout: dict, steps: int, *flags: str):
    path, run_dir = write_config(tmp_path / name, parallelism=layout, train={"steps": steps},
                                 checkpoint={"interval": 3})
    done = mimo("train", str(path), "--quiet", *flags, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_heterogeneous_run_resumes_on_colocated_gpus(tmp_path):
    whole = steps_and_losses(_train(tmp_path, "whole", HETEROGENEOUS, 6))
    first = _train(tmp_path, "cut", HETEROGENEOUS, 3)
    path, run_dir = write_config(tmp_path / "cut", parallelism=COLOCATED, train={"steps": 6},
                                 checkpoint={"interval": 3})
    assert run_dir == first
    done = mimo("train", str(path), "--quiet", "--resume", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = steps_and_losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        rel = abs(resumed[step] - whole[step]) / abs(whole[step])
        assert rel <= 1e-9, f"step {step}: resumed on colocated {resumed[step]!r}, uninterrupted {whole[step]!r}"
