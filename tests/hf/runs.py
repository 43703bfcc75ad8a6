"""`mimo train` runs the Hugging Face tests share: their layouts, and a one-step run to a checkpoint."""

from __future__ import annotations

from pathlib import Path

from tests.test_train_cli import mimo, write_config

ONE_RANK = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}
HETEROGENEOUS_TP2 = {"images": {"data_parallel_size": 1},
                     "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 1}}


def train(tmp_path: Path, model: dict, layout: dict, lr: float) -> Path:
    """A one-step `mimo train` run on `layout`; its final checkpoint."""
    path, run_dir = write_config(tmp_path, model=model, parallelism=layout, data={"name": "synthetic",
                                 "num_samples": 16, "items_per_sample": [1]},
                                 train={"steps": 1, "global_batch_size": 2, "num_microbatches": 1, "lr": lr,
                                        "dtype": "float32"}, checkpoint={"interval": 0}, eval={"enabled": False})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000001"
