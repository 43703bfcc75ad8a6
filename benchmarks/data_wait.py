"""How long the training step waits for data when every image is a JPEG decoded and preprocessed per step.

    PYTHONPATH=src python benchmarks/data_wait.py --json benchmarks/results/data_wait_h200_1b.json   # 1 GPU, 1b
    PYTHONPATH=src python benchmarks/data_wait.py --dry-run                                           # CPU, tiny

A LLaVA-pretraining-like dataset is written once to a temporary directory: `--samples` JPEG files of
`--source-size` pixels (structured content plus noise, quality 90, so files and decode cost are photo-like),
each sample `[bos] <image>×T caption...` of `--seq-len` ids. Sample i is read from disk, decoded with Pillow
and preprocessed by `mimo.hf.image.ImageProcessor` as CLIP does (resize the shortest side to the model's image
size, bicubic; center crop; rescale; normalize with CLIP's mean and std) on every access, as a real run does.

The model, trainer and step are `mimo train`'s (`plan_model(config).provider_on(device)`,
`provide_distributed_model`, `build_trainer`;
one process, layout images and language both on rank 0, bf16 autocast, float32 parameters), fed by
`mimo.data.BatchPrefetcher`, the loader `mimo train` uses, once per `--workers` value (0: batches built in the
training process). Per step: the time blocked in `next(loader)` (the wait) and the wall time from there to the
end of `train_step` (which ends with the step's one host sync, so the GPU's work is done). Reported: the wait
as a percentage of the step (issue 15's target: at most 2% at the 1b preset), and, for scale, the time to
build one global batch in this process. Speed is measured here, never asserted by a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402

from mimo.data import BatchPrefetcher, GlobalBatchSampler, MimoBatch, Sample, next_token_labels  # noqa: E402
from mimo.data.prefetch import default_num_workers  # noqa: E402
from mimo.hf.image import ImageProcessor  # noqa: E402
from mimo.training.plan import plan_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_speed import init_world  # noqa: E402  (a world of one: NCCL on CUDA, gloo on CPU)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_ID, PAD_ID = 1, 0
# preset -> (global batch, sequence length): llava_speed's shapes (1b: 8 × 2048, one micro-batch on an H200)
SHAPES = {"tiny": (4, 64), "1b": (8, 2048), "3b": (4, 2048), "7b": (4, 2048)}


def write_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    """`count` JPEGs of `size` (width, height): gradients, shapes and grain, so they compress like photos."""
    from PIL import ImageDraw

    for i in range(count):
        base = Image.merge("RGB", (Image.linear_gradient("L").rotate(17 * i).resize(size),
                                   Image.radial_gradient("L").resize(size),
                                   Image.effect_noise(size, 24 + i % 40)))
        draw = ImageDraw.Draw(base)
        for k in range(6):
            x, y = (37 * (i + k) * (k + 1)) % size[0], (53 * (i + 2 * k)) % size[1]
            draw.ellipse((x, y, x + size[0] // 4, y + size[1] // 5), fill=((40 * k + i) % 256, 90, (7 * i) % 256))
        base.save(folder / f"{i:06d}.jpg", quality=90)


class JpegCaptions:
    """Sample i: JPEG i decoded and CLIP-preprocessed on access, and a caption of random text ids."""

    def __init__(self, folder: Path, count: int, processor: ImageProcessor, image_token_id: int,
                 tokens_per_image: int, seq_len: int, text_vocab: int) -> None:
        self.folder, self.count, self.processor = folder, count, processor
        self.image_token_id, self.tokens_per_image = image_token_id, tokens_per_image
        self.seq_len, self.text_vocab = seq_len, text_vocab

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        with Image.open(self.folder / f"{index:06d}.jpg") as image:
            pixels = self.processor(image)
        gen = torch.Generator().manual_seed(index)
        caption = torch.randint(3, self.text_vocab, (self.seq_len - self.tokens_per_image - 1,), generator=gen)
        ids = torch.cat([torch.tensor([BOS_ID]), torch.full((self.tokens_per_image,), self.image_token_id), caption])
        return Sample(ids, next_token_labels(ids), {"images": pixels.unsqueeze(0)})

    def batch(self, indices) -> MimoBatch:
        return MimoBatch.collate([self[i] for i in indices], PAD_ID)


def build_trainer(preset: str, batch: int, microbatches: int, dtype: str, device: torch.device):
    """The provider and trainer exactly as `mimo train` builds them for a one-process run."""
    from mimo.training.loop import build_trainer
    from mimo.training.run_config import parse_run_config

    init_world(device)
    config = parse_run_config({
        "parallelism": {"images": {}, "language": {}}, "model": {"preset": preset},
        "train": {"global_batch_size": batch, "num_microbatches": microbatches, "dtype": dtype, "lr": 1e-4,
                  "steps": 10**6},
        "data": {"name": "synthetic"},
    })
    provider = plan_model(config).provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    return provider, build_trainer(config, provider, model, device)


def build_ms(dataset: JpegCaptions, batch: int, repeats: int = 3) -> float:
    """Milliseconds to build one global batch in this process (decode + preprocess + collate), the best of a few."""
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        dataset.batch([(r * batch + i) % len(dataset) for i in range(batch)])
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def measure(trainer, dataset: JpegCaptions, workers: int, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Warm-up steps, then timed ones: per step the wait in `next(loader)` and the step's wall time."""
    sampler = GlobalBatchSampler(len(dataset), args.batch, seed=0)
    waits, steps = [], []
    t_start = time.perf_counter()
    with BatchPrefetcher(dataset, sampler, pin_memory=cuda, num_workers=workers,
                         prefetch_factor=args.prefetch_factor) as loader:
        for _ in range(args.warmup):
            trainer.train_step(next(loader))
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            result = trainer.train_step(batch)
            t2 = time.perf_counter()
            waits.append(t1 - t0)
            steps.append(t2 - t0)
    return {"num_workers": workers, "prefetch_factor": args.prefetch_factor, "steps": args.steps,
            "wait_pct": 100 * sum(waits) / sum(steps), "wait_ms_mean": 1e3 * sum(waits) / len(waits),
            "wait_ms_max": 1e3 * max(waits), "step_ms_mean": 1e3 * sum(steps) / len(steps),
            "loss_last": result.loss, "seconds_total": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU, a few steps (seconds)")
    parser.add_argument("--preset", default=None, help="model preset (default: 1b; tiny with --dry-run)")
    parser.add_argument("--workers", default=None, help="comma separated num_workers values (default: 0 and "
                        "mimo's default for one rank on this machine, min(8, CPUs - 1))")
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's, 1b: 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: 1b: 2048)")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--samples", type=int, default=None, help="JPEG files written (default 512; 16 dry)")
    parser.add_argument("--source-size", default=None, help="WxH of the JPEGs (default 336x336; 32x32 dry)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 dry)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 dry)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", default=None, help="write the environment and records to this file")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    args.preset = args.preset or ("tiny" if dry else "1b")
    args.batch = args.batch or SHAPES[args.preset][0]
    args.seq_len = args.seq_len or SHAPES[args.preset][1]
    args.samples = args.samples or (16 if dry else 512)
    args.warmup = (1 if dry else 3) if args.warmup is None else args.warmup
    args.steps = max(1, (2 if dry else 20) if args.steps is None else args.steps)
    width, height = (int(v) for v in (args.source_size or ("32x32" if dry else "336x336")).split("x"))
    workers = [int(w) for w in (args.workers or f"0,{max(1, default_num_workers(1))}").split(",")]

    env = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "preset": args.preset, "global_batch": args.batch, "seq_len": args.seq_len,
           "microbatches": args.microbatches, "dtype": args.dtype, "jpeg_size": f"{width}x{height}",
           "samples": args.samples}
    print("# data_wait: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    provider, trainer = build_trainer(args.preset, args.batch, args.microbatches, args.dtype, device)
    side = provider.vision_config.image_size
    processor = ImageProcessor(size={"shortest_edge": side}, do_center_crop=True,
                               crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="data_wait_jpegs_") as folder:
        t0 = time.perf_counter()
        write_images(Path(folder), args.samples, (width, height))
        megabytes = sum(p.stat().st_size for p in Path(folder).iterdir()) / 1e6
        print(f"# wrote {args.samples} JPEGs ({megabytes:.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
        env["jpeg_mb"] = megabytes
        dataset = JpegCaptions(Path(folder), args.samples, processor, provider.image_token_id,
                               provider.vision_config.tokens_per_image, args.seq_len,
                               min(provider.language_config.vocab_size, provider.image_token_id))
        env["build_ms"] = build_ms(dataset, args.batch)
        print(f"# one global batch built in this process: {env['build_ms']:.1f} ms", flush=True)
        print("| num_workers | wait % of step | wait ms (mean / max) | step ms |\n|---|---|---|---|", flush=True)
        for w in workers:
            record = measure(trainer, dataset, w, args, cuda)
            records.append(record)
            print(f"| {w} | {record['wait_pct']:.2f}% | {record['wait_ms_mean']:.1f} / {record['wait_ms_max']:.1f} | "
                  f"{record['step_ms_mean']:.1f} |", flush=True)
            if args.json:  # after every row, so a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"env": env, "records": records}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"env": env, "records": records}


if __name__ == "__main__":
    main()
