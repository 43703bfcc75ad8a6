"""What DDP's machinery costs a step on its own: one GPU, a one-rank world, so the all-reduce moves nothing and
every difference between the variants is host work and copies (issue 13: DP2 adds ~0.1 s to mimo's step).

The deployments benchmark's workload (`deployments.py`: preset, encoder-heavy batch, compile) in one process,
built as `mimo train` builds it, then the trainable modules wrapped per `--variant`:

- `none`: as mimo builds DP 1 (no DDP: nothing to reduce);
- `mimo`: `mimo.distributed.wrap_ddp`, as DP > 1 builds it (torch DDP with mimo's Python SUM comm hook, the
  gradients as bucket views, dynamo's DDP optimizer off);
- `mimo-split-copy`: mimo's DDP as it was before 2026-12-01 (runs 1-2 in RESULTS.md): the DDP optimizer splits
  every compiled block at the bucket boundaries, and the gradients are copied into the buckets and back;
- `mimo-copy`: only the second of those two;
- `torch`: torch DDP with its built-in C++ all-reduce (a mean: the same at one rank), no hook, torch's defaults
  (split, copies);
- `torch-100mb`: the same with 100 MB buckets instead of 25.

Each variant runs in its own process (rebuilt, recompiled); `--warmup` steps, then `--steps` timed ones (wall,
synchronized), then one profiled step (GPU busy and idle, `step_profile.py`). One JSON line per variant.

    python benchmarks/ddp_overhead.py --variant none,mimo,torch,torch-100mb --json out.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parent))
from deployments import WORKLOADS, make_dataset  # noqa: E402

from mimo.distributed import ModuleDistributedConfig, module_of, set_module, wrap_ddp  # noqa: E402
from mimo.training.loop import build_trainer  # noqa: E402
from mimo.training.plan import plan_model  # noqa: E402
from mimo.training.run_config import parse_run_config  # noqa: E402

VARIANTS = ("none", "mimo", "mimo-copy", "mimo-split-copy", "torch", "torch-100mb")


def _ddp_with(*args, gradient_as_bucket_view: bool, **kwargs) -> DDP:
    """torch DDP with `gradient_as_bucket_view` set here, whatever mimo passes."""
    return DDP(*args, **{**kwargs, "gradient_as_bucket_view": gradient_as_bucket_view})


def wrap(model, infra, variant: str, compute: torch.dtype | None) -> None:
    """Wrap every trainable hosted module in DDP over its (one-rank) DP group, the variant's way."""
    if variant == "none":
        return
    for name, grid in infra.module_to_grid_map.items():
        module = module_of(model, name)
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if variant.startswith("mimo"):
            if "split" in variant:  # graphs split at DDP's buckets (the setting compiled blocks now turn off)
                torch._dynamo.config.optimize_ddp = True
            views = not variant.endswith("copy")
            ddp = functools.partial(_ddp_with, gradient_as_bucket_view=views)
            with mock.patch("mimo.distributed.DDP", ddp):
                wrap_ddp(model, name, grid, ModuleDistributedConfig("ddp", compute))
            continue
        if compute is not None:
            module.forward = torch.autocast("cuda", dtype=compute)(module.forward)  # as `wrap_ddp`
        cap = 100 if variant == "torch-100mb" else 25
        set_module(model, name, DDP(module, process_group=grid.get_group("dp_cp"), init_sync=False,
                                    bucket_cap_mb=cap))


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Build, wrap, warm up, time and profile one variant in this process."""
    from step_profile import profile_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    store = dist.FileStore(tempfile.mktemp(), 1)
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    else:  # a functional check (tiny preset, float32): no timing worth reading
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    workload = WORKLOADS[args.workload]
    config = parse_run_config({
        "model": {"preset": args.preset}, "parallelism": {"images": {}, "language": {}},
        "train": {"global_batch_size": args.batch, "num_microbatches": args.microbatches,
                  "dtype": "bfloat16" if cuda else "float32", "compile": args.compile and cuda,
                  "lr": 1e-4, "steps": args.warmup + args.steps + 1},
        "data": {"name": "synthetic", "items_per_sample": [workload["images_per_sample"]]},
        "eval": {"enabled": False}})
    provider = plan_model(config).provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    wrap(model, provider.build_infra(), variant, config.distributed_config.default.compute_dtype)
    trainer = build_trainer(config, provider, model, device)
    seq_len = workload["seq_len" if cuda else "tiny_seq_len"]
    data = make_dataset(provider, config, workload["images_per_sample"], seq_len)
    batches = [data.batch(range(i * args.batch, (i + 1) * args.batch), seq_len=seq_len)
               for i in range(args.warmup + args.steps + 1)]
    batches = [b.pin_memory() for b in batches] if cuda else batches
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    walls = []
    for i, batch in enumerate(batches[:-1]):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        sync()
        if i >= args.warmup:
            walls.append(time.perf_counter() - t0)
    none = {"gpu_busy_ms": 0.0, "gpu_idle_ms": 0.0, "kernels": 0, "copy_ms": 0.0}
    profile = profile_step(lambda: trainer.train_step(batches[-1])) if cuda else none
    dist.destroy_process_group()
    return {"variant": variant, "step_s": statistics.median(walls), "steps_s": walls,
            **{k: profile[k] for k in none}, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "batch": args.batch,
            "microbatches": args.microbatches, "compile": args.compile, "preset": args.preset}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default=",".join(VARIANTS), help=f"comma separated, of {list(VARIANTS)}")
    p.add_argument("--preset", default="1b", help="without a GPU: use tiny (a functional check on gloo)")
    p.add_argument("--workload", default="encoder-heavy", choices=sorted(WORKLOADS))
    p.add_argument("--batch", type=int, default=4, help="samples per step (DP2's per-GPU share of 8: 4)")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", type=Path, default=None, help="append one line per variant here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: this variant only
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args, args.one)), flush=True)
        return
    for variant in args.variant.split(","):
        if variant not in VARIANTS:
            p.error(f"--variant {variant!r}: choose from {list(VARIANTS)}")
        argv = [*sys.argv[1:], "--one", variant]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                             env={**os.environ})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"# {variant}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        print(f"# {variant}: step {row['step_s'] * 1e3:.1f} ms, GPU busy {row['gpu_busy_ms']:.1f} ms, idle "
              f"{row['gpu_idle_ms']:.1f} ms, {row['kernels']} kernels, copies {row['copy_ms']:.1f} ms", flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
