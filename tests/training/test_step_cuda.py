"""On a GPU (skipped without one): a training step blocks the host once, at its end.

Every host sync empties the GPU queue, and the work launched after it starts on an idle GPU: on one H100 the
per-micro-batch syncs of an earlier step cost 6% (benchmarks/NOTES.md §2). CUDA's sync debug mode makes every
synchronizing call warn; the step must make exactly one, the read of the loss and the norm after the update.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _trainer_and_batches(num_microbatches: int, compile_blocks: bool, packing: bool = False, **train):
    """The tiny LLaVA of `mimo train` on a one-rank NCCL world (images and language on rank 0), bf16, its samples
    packed into one row per micro-batch or padded; `train`: more keys of the train section."""
    from mimo.training.loop import build_trainer
    from mimo.training.plan import plan_model
    from mimo.training.run_config import parse_run_config

    config = parse_run_config({
        "parallelism": {"images": {}, "language": {}}, "model": {"preset": "tiny"},
        "train": {"global_batch_size": 8, "num_microbatches": num_microbatches, "dtype": "bfloat16", "steps": 10,
                  "compile": compile_blocks, **train},
        "data": {"name": "synthetic", "packing": packing},
    })
    device = torch.device("cuda", torch.cuda.current_device())
    provider = plan_model(config).provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    data = plan_model(config).dataset(provider)
    return build_trainer(config, provider, model, device), [data.batch(range(i * 8, i * 8 + 8)) for i in range(3)]


@pytest.mark.parametrize(("num_microbatches", "compile_blocks", "packing"),
                         [(1, False, False), (2, False, False), (2, True, False), (2, True, True)])
def test_a_step_syncs_the_host_once(tmp_path, num_microbatches, compile_blocks, packing):
    """Packed rows too: their varlen attention takes the documents' bounds found on the host."""
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=device)
    try:
        trainer, batches = _trainer_and_batches(num_microbatches, compile_blocks, packing)
        for batch in batches[:2]:  # warm up: first-use allocations and NCCL setup may sync
            trainer.train_step(batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train_step(batches[2])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1 and syncs[0].endswith(_final_read_line()), sorted(Counter(syncs).items())


def _final_read_line() -> str:
    """step.py's line that reads the step's loss, count and norm (the one sync allowed; the build's one-time
    reads, such as which modules train, also call `.tolist()` and come earlier in the file)."""
    import mimo.training.step as step

    lines = Path(step.__file__).read_text().splitlines()
    return f"step.py:{next(i for i, line in enumerate(lines, 1) if 'loss_sum, tokens, norm' in line)}"


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_recomputation_keeps_less_and_trains_alike(tmp_path, compile_blocks):
    """`recompute_granularity: full` lowers the step's peak memory above what persists (measured after the first
    step, which allocates the gradients and AdamW's state: activations are then what the peak holds) and
    trains alike: the first loss is the same forward, the later ones differ by the bf16 kernels' run-to-run
    noise at most (attention backward may accumulate in another order), far below a wrong gradient's effect."""
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=device)
    runs = {}
    try:
        for recompute in ("none", "full"):
            trainer, batches = _trainer_and_batches(2, compile_blocks, recompute_granularity=recompute)
            losses = [trainer.train_step(batches[0]).loss]  # gradients and AdamW's state exist after it
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            losses += [trainer.train_step(batch).loss for batch in batches[1:]]
            runs[recompute] = (losses, torch.cuda.max_memory_allocated() - start)
            del trainer
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    (plain, plain_peak), (full, full_peak) = runs["none"], runs["full"]
    print(f"\npeak above the trained model: {plain_peak / 2**20:.1f} MiB plain, {full_peak / 2**20:.1f} MiB "
          f"recomputed; losses {plain} / {full}")
    assert full[0] == plain[0]
    assert full == pytest.approx(plain, rel=1e-3)
    assert full_peak < 0.8 * plain_peak
