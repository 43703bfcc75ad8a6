"""Sequence packing on one device: real (non-pad) tokens per second of `mimo train`'s step, packed vs padded.

    PYTHONPATH=src python benchmarks/packing.py --json benchmarks/results/packing_h200.json   # 1b, one GPU, ~3 min
    PYTHONPATH=src python benchmarks/packing.py --dry-run                                      # tiny, CPU, seconds

The step is the real `MimoTrainer.train_step`, built the way `mimo train` builds it
(`plan_model(config).provider_on(device)`,
`provide_distributed_model`, `build_trainer`) on a world of one, layout `images` and `language` both on rank
0, bf16 compute; the two rows differ only in `data.packing` (false: each micro-batch padded to its batch's
longest sample, as `MimoBatch.collate` does; true: each micro-batch's samples end to end in one row, rounded
up to 128 positions, attention per sample through compiled flex_attention).

Data: an instruction-mix-like length distribution (LLaVA-Instruct-665K: mostly short single-image turns, a few
long conversations, some text-only samples): text length lognormal (median `--median` tokens, sigma
`--sigma`), at least 50 tokens, the whole sample at most 2048; one image (576 tokens at 336 px) on
`--image-fraction` of the samples. Both rows train on the same batches from the same initial weights.

Reported per row: step time, real tokens/s (`StepResult.tokens`, what `metrics.jsonl`'s `tokens_per_s` counts: each
sample up to its last scored label or image token, padding excluded), positions/s (`StepResult.positions`, what the
model computed, padding included), the share of positions that are padding, the first step's loss (the two
rows' agree to bf16 rounding: same batches, same weights) and peak memory. Warm-up steps are not timed (they
include flex_attention's compilations: one per new row length until the length dimension turns dynamic).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from llava_speed import init_world  # noqa: E402  (a world of one: NCCL on CUDA, gloo on CPU)

from mimo.data import MimoBatch, Sample, next_token_labels  # noqa: E402
from mimo.data.packing import real_tokens  # noqa: E402
from mimo.families.llava import LlavaMimoProvider  # noqa: E402
from mimo.training.plan import plan_model  # noqa: E402

MAX_LEN = 2048
# The instruction-mix text lengths (module docstring): lognormal median and sigma, shortest text, image share.
INSTRUCTION_MIX = {"median": 150.0, "sigma": 1.0, "min_text": 50, "image_fraction": 0.85}


def sample_lengths(n: int, median: float, sigma: float, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """n text lengths: lognormal(log median, sigma), clipped to [lo, hi]."""
    draws = torch.randn(n, generator=gen, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(max(round(math.exp(x)), lo), hi)) for x in draws.tolist()]


def make_batches(provider: LlavaMimoProvider, args: argparse.Namespace, count: int) -> list[MimoBatch]:
    """`count` global batches of `args.batch` samples: [bos, (<image>×T), text...], next-token labels."""
    vision, language = provider.vision_config, provider.language_config
    tokens, limit = vision.tokens_per_image, min(MAX_LEN, language.max_seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(count):
        samples = []
        with_image = (torch.rand(args.batch, generator=gen) < args.image_fraction).tolist()
        text = sample_lengths(args.batch, args.median, args.sigma, args.min_text, limit, gen)
        for image, n in zip(with_image, text, strict=True):
            n = min(n, limit - 1 - tokens * image)
            ids = torch.randint(3, language.vocab_size, (1 + tokens * image + n,), generator=gen)
            ids[0] = 1
            ids[1:1 + tokens * image] = provider.image_token_id
            pixels = torch.randn(int(image), vision.num_channels, vision.image_size, vision.image_size, generator=gen)
            samples.append(Sample(ids, next_token_labels(ids), {"images": pixels}))
        out.append(MimoBatch.collate(samples, pad_id=0))
    return out


# Rows: name → (data.packing, the CUDA kernel for packed rows, micro-batches: None is --microbatches). "packed,
# half micro-batches" holds twice the samples per packed row: about the positions a padded micro-batch computes.
ROWS = {
    "padded": (False, None, None),
    "packed": (True, "varlen", None),
    "packed-flex": (True, "flex", None),
    "packed-half-mb": (True, "varlen", 0.5),
}


def build_trainer(args: argparse.Namespace, packing: bool, device: torch.device, microbatches: int):
    """The model and step exactly as `mimo train` builds them, with `data.packing` as asked."""
    from mimo.training.loop import build_trainer as build_step
    from mimo.training.run_config import parse_run_config

    config = parse_run_config({
        "parallelism": {"images": {}, "language": {}},
        "model": {"preset": args.preset},
        "train": {"global_batch_size": args.batch, "num_microbatches": microbatches, "dtype": args.dtype,
                  "lr": 1e-5, "steps": 10**6, "compile": args.compile},
        "data": {"name": "synthetic", "packing": packing},
    })
    provider = plan_model(config).provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    return build_step(config, provider, model, device)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter: a benchmark's measure, not mimo's)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_row(args: argparse.Namespace, name: str, batches: list[MimoBatch], device: torch.device) -> dict[str, Any]:
    """Warm-up steps, then timed steps over the batches; the row's figures, with the graphs compiled after the
    warm-up (a packed length the warm-up did not see costs one)."""
    import mimo.models.attention as attention

    packing, kernel, share = ROWS[name]
    microbatches = args.microbatches if share is None else max(1, int(args.microbatches * share))
    attention.CUDA_DOCUMENT_KERNEL = kernel or "varlen"
    if args.compile:
        torch._dynamo.reset()
    trainer = build_trainer(args, packing, device, microbatches)
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
        torch.cuda.reset_peak_memory_stats()
    first_loss, positions, times, real, warm_graphs = None, 0, [], 0, 0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            warm_graphs = compiled_graphs()
        t0 = time.perf_counter()
        result = trainer.train_step(batch)  # ends in the step's one host sync: the device is done
        elapsed = time.perf_counter() - t0
        first_loss = result.loss if first_loss is None else first_loss
        if i >= args.warmup:
            times.append(elapsed)
            real += result.tokens  # the step's own counts, as `metrics.jsonl` logs them
            positions += result.positions
    if args.profile and device.type == "cuda":
        profile_step(trainer, batches[-1], name)
    seconds = sum(times)
    row = {"row": name, "microbatches": microbatches, "kernel": kernel, "steps": len(times),
           "graphs_during_warmup": warm_graphs, "graphs_after_warmup": compiled_graphs() - warm_graphs,
           "step_ms": 1e3 * seconds / len(times),
           "real_tokens_per_s": real / seconds, "positions_per_s": positions / seconds,
           "padding_fraction": 1 - real / positions, "loss_first_step": first_loss,
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(json.dumps(row), flush=True)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_step(trainer: Any, batch: MimoBatch, name: str) -> None:
    """One more step under torch.profiler: the step's wall time against its GPU kernels' total, and the kernels
    that take the most GPU time (where a row's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.train_step(batch)
        wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    gpu = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e3
    print(f"profile {name}: step {1e3 * wall:.0f} ms wall, {gpu:.0f} ms of GPU kernels (the rest: the GPU idle)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=32, help="global batch (samples)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    mix = INSTRUCTION_MIX
    p.add_argument("--median", type=float, default=mix["median"], help="median text tokens per sample")
    p.add_argument("--sigma", type=float, default=mix["sigma"], help="lognormal sigma of the text length")
    p.add_argument("--min-text", type=int, default=mix["min_text"])
    p.add_argument("--image-fraction", type=float, default=mix["image_fraction"])
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile every decoder block")
    p.add_argument("--rows", default="padded,packed", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--profile", action="store_true", help="profile one extra step per row (CUDA): top kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU, float32, 1+1 steps (seconds)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.device, args.dtype = "tiny", "cpu", "float32"
        args.batch, args.microbatches, args.warmup, args.steps = 8, 2, 1, 1
        args.median, args.min_text = 20.0, 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    init_world(device)
    provider = LlavaMimoProvider.preset(args.preset)
    batches = make_batches(provider, args, args.warmup + args.steps)
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown or "padded" not in names:
        raise SystemExit(f"--rows {args.rows}: give 'padded' and any of {', '.join(ROWS)}")
    rows = [run_row(args, name, batches, device) for name in names]
    padded = rows[names.index("padded")]
    for r in rows:
        r["speedup_real_tokens_per_s"] = r["real_tokens_per_s"] / padded["real_tokens_per_s"]
    results = {
        "benchmark": "packing", "preset": args.preset, "device": torch.cuda.get_device_name(0)
        if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
        "dtype": args.dtype, "global_batch": args.batch, "microbatches": args.microbatches,
        "lengths": {"median_text": args.median, "sigma": args.sigma, "min_text": args.min_text, "max": MAX_LEN,
                    "image_fraction": args.image_fraction,
                    "mean_sample_tokens": sum(real_tokens(b, provider.special_token_ids) for b in batches)
                    / (len(batches) * args.batch)},
        "command": " ".join(["python", "benchmarks/packing.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }
    print("| row | micro-batches | step ms | real tokens/s (× padded) | positions/s | padding | first loss | "
          "peak GB | graphs after warm-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(f"| {args.preset} {r['row']} | {r['microbatches']} | {r['step_ms']:.0f} | "
              f"{r['real_tokens_per_s']:.0f} ({r['speedup_real_tokens_per_s']:.2f}×) | {r['positions_per_s']:.0f} | "
              f"{100 * r['padding_fraction']:.0f}% | {r['loss_first_step']:.4f} | {peak} | "
              f"{r['graphs_after_warmup']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
