"""`mimo train` on one GPU (skipped without one): the worker is forked from the launcher (`launch.start_method`),
so CUDA and NCCL must work in a process whose parent imported torch. Losses equal the same run on the CPU.

float64 on both, so only the order of float64 sums differs (~1e-16): 1e-9 relative leaves room for that and
nothing else. The second run adds loader workers: processes forked again from the CUDA worker.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_train_cli import mimo, steps_and_losses, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ONE_RANK = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 0}}


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_forked_worker_trains_on_the_gpu_like_the_cpu(tmp_path, loader_workers):
    runs = {}
    for device, visible in (("cuda", "0"), ("cpu", "")):
        path, run_dir = write_config(tmp_path / device, parallelism=ONE_RANK, data={"num_workers": loader_workers})
        done = mimo("train", str(path), "--quiet", env={"CUDA_VISIBLE_DEVICES": visible}, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[device] = steps_and_losses(run_dir)
    assert sorted(runs["cuda"]) == [1, 2, 3, 4]
    for step, loss in runs["cpu"].items():
        assert abs(runs["cuda"][step] - loss) <= 1e-9 * abs(loss), (step, runs["cuda"][step], loss)
