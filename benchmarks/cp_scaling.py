"""Issue 30's two-GPU context-parallel runs: longest packed sequence, speed per GPU, the encoder, loss curves.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    PYTHONPATH=src python benchmarks/cp_scaling.py --longest --json longest.json         # CP1's, then CP2's
    PYTHONPATH=src python benchmarks/cp_scaling.py --speed --encoder --length 16384 --at-longest L1 --json s.json
    PYTHONPATH=src python benchmarks/cp_scaling.py --curves 200 --length 8192 --json curves.json
    PYTHONPATH=src python benchmarks/cp_scaling.py --dry-run --json out.json   # all four on CPU, gloo, tiny (CI)

The model is the LLaVA-1.5-7B preset (CLIP ViT-L/14-336: 576 tokens an image; Vicuna-7B's decoder) with only
`--layers` decoder layers (default 4: a whole 7B with AdamW is 112 GB of fp32 state, more than one H100), the
rotary table as long as the row. Random weights are drawn on the device (mimo's seeded init; no download).
Every run is bf16 autocast over float32 parameters, full recomputation of every block (encoder and decoder),
AdamW, clip 1.0, `data.packing` on. Its data: one packed row per language replica and step, `--row-docs`
documents end to end (default 4; the last takes what the length leaves), each document images of 576 tokens
with `--text-per-image` text tokens after each (default 32): many images per sample, short text.

A world is started the way `mimo train` starts one (`run_on_a_free_port`, as `benchmarks/deployments.py`), its
ranks build the run as `mimo train` does (`plan_model`, `provide_distributed_model`, `build_trainer`,
`MimoTrainer.train_step`). CP1 is a world of one (one GPU of the two), CP2 and DP2 worlds of two. The
homogeneous layout (the encoder in the language model's layout: under CP2 each CP rank encodes a share of
the images) except in `--encoder`.
- `--longest`: for CP1 and CP2 (`--cps`) a doubling search on the row length from `--start` (CP2 from twice
  CP1's longest when both run; halving first if the start does not fit), then bisection until the bounds are
  within `--resolution`; each probe is its own world (a fresh process: nothing of an earlier probe's memory
  survives) running one step; an out-of-memory error is caught, written by the rank it hit and reported with
  the probe (that rank exits, and the agent stops the world's other rank, which may wait in a collective); a
  probe failing otherwise stops the search with its error (shorter rows would fail alike). No probe starts
  that its estimate puts past `--budget-s` (the search then stops where it is: `settled` false).
  Prints CP2's longest over CP1's (target >= 1.8).
- `--speed`: at `--length` tokens/s per GPU of CP1 and CP2 (target CP2 >= 0.9x CP1), and at `--at-longest`
  (default: this call's `--longest` result for CP1, else `--length`) CP2 against homogeneous DP2 (two rows, one
  per GPU), recomputation on in both.
- `--encoder`: colocated images DP2 + language CP2, against the same run where each CP rank encodes CP times its
  share of images (its share repeated, in one call: the work of the micro-batch's whole image set, which
  Megatron-LM's `_forward_all_modules` does on every CP rank; mimo has no such switch, so this benchmark
  patches the encoder's forward: `replicate_encoder`). Reports the encoder's forward + backward ms per step per
  GPU (llava_speed's `ModuleTimer`, on one extra step; target: about half).
- `--curves N`: N steps of CP2 and of CP1 from the same seed on the same batches (step i's data seeded by i),
  the relative difference of the mean loss over the last 50 steps (target <= 1e-2).
The timed modes' jobs share one world per size, shortest rows first; a timed row stops after the step that takes
its steps past `--job-budget-s` (at least one timed step; `steps` says how many). The JSON (`--json`) has every
record and the environment (`llava_speed.write_json`), written after each mode and each `--longest` probe.
`--dry-run`: CPU, gloo, the tiny preset with 2 layers and rows of 64-256 tokens, 1 step each, a simulated
memory capacity (`--simulate-capacity` tokens per rank: a probe beyond it raises torch.OutOfMemoryError before
its step, so the search's out-of-memory path runs without a GPU): a functional check, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

sys.path.insert(0, str(Path(__file__).resolve().parent))  # llava_speed and deployments, beside us

from deployments import slowest  # noqa: E402
from llava_speed import ModuleParts, ModuleTimer, write_json  # noqa: E402

from mimo.data import MimoBatch, Sample, next_token_labels  # noqa: E402
from mimo.distributed import unwrap  # noqa: E402
from mimo.families.llava import LlavaMimoProvider  # noqa: E402
from mimo.launch import _reason, run_on_a_free_port  # noqa: E402
from mimo.models.decoder import IGNORE_INDEX  # noqa: E402
from mimo.provider import ModuleSpec, ProviderError  # noqa: E402
from mimo.training.loop import build_trainer, run_in_world  # noqa: E402
from mimo.training.metrics import Clock, peak_memory_gb  # noqa: E402
from mimo.training.plan import plan_model  # noqa: E402
from mimo.training.run_config import RunConfig, parse_run_config  # noqa: E402

IMAGES, LANGUAGE = "images", "language"
TARGETS = {"longest_ratio": 1.8, "speed_ratio": 0.9, "encoder_ratio": 0.5, "curves_rel": 1e-2}
CURVE_TAIL = 50
CP1_SHARE = 0.55  # of --budget-s, for a --longest search another follows
OOM_EXIT = 3  # a rank that ran out of memory exits so: the agent stops the world's other ranks
NCCL_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")  # the commands set them


# -- the run of one world --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One run in a world: its layout, row length and what to measure."""

    name: str
    cp: int = 1  # the language model's context-parallel size
    dp: int = 1  # its data-parallel size (rows per step)
    colocated: bool = False  # images DP = world (else: homogeneous, the encoder in the language layout)
    length: int = 0  # tokens of each packed row
    steps: int = 1  # timed steps (after `warmup`)
    warmup: int = 0
    replicate_encoder: bool = False  # Megatron's way: each CP rank encodes CP times its share
    time_encoder: bool = False  # one more step under llava_speed's ModuleTimer
    curve: bool = False  # step i on data seeded i (else one batch for every step)

    @property
    def world(self) -> int:
        """Ranks of its world: CP x DP."""
        return self.cp * self.dp


def run_config(job: Job, args: argparse.Namespace) -> RunConfig:
    """The `mimo train` config of a job (checked before launching)."""
    language = {"context_parallel_size": job.cp, "data_parallel_size": job.dp}
    images = {"data_parallel_size": job.world} if job.colocated else dict(language)
    return parse_run_config({
        "model": {"preset": args.preset},
        "parallelism": {IMAGES: images, LANGUAGE: language},
        "train": {"steps": 10**6, "global_batch_size": args.row_docs * job.dp, "num_microbatches": 1,
                  "dtype": args.dtype, "lr": 1e-4, "weight_decay": 0.0, "clip_grad": 1.0, "seed": args.seed,
                  "recompute_granularity": "full", "timeout_s": float(args.timeout)},
        "data": {"name": "synthetic", "packing": True},
        "log": {"dir": str(args.out / job.name), "interval": 1},
        "eval": {"enabled": False},
    })


def shaped(provider: Any, layers: int, length: int) -> Any:
    """The provider with `layers` decoder layers and rotary positions for `length` tokens (a copy: `placed`)."""
    spec = provider.language_model_spec
    config = dataclasses.replace(spec.params["config"], num_layers=layers,
                                 max_seq_len=max(length, spec.params["config"].max_seq_len))
    provider.language_model_spec = ModuleSpec(spec.module, {**spec.params, "config": config}, spec.submodules)
    return provider


def document(provider: Any, images: int, text_per_image: int, extra_text: int, gen: torch.Generator) -> Sample:
    """[bos, (576 image tokens, text) x images, extra text, eos], every text target scored, random pixels."""
    vision, vocab = provider.vision_config, provider.language_config.vocab_size
    pieces = [torch.tensor([1])]
    for _ in range(images):
        pieces += [torch.full((vision.tokens_per_image,), provider.image_token_id),
                   torch.randint(3, vocab - 1, (text_per_image,), generator=gen)]
    pieces += [torch.randint(3, vocab - 1, (extra_text,), generator=gen), torch.tensor([2])]
    ids = torch.cat(pieces)
    labels = next_token_labels(ids)
    labels[labels == provider.image_token_id] = IGNORE_INDEX
    pixels = torch.randn(images, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    return Sample(ids, labels, {IMAGES: pixels})


def packed_documents(provider: Any, length: int, docs: int, text_per_image: int, seed: int) -> list[Sample]:
    """Documents of `length` tokens in all: `docs` - 1 alike, the last taking what remains (images, then text)."""
    per_image = provider.vision_config.tokens_per_image + text_per_image
    share = length // docs
    if share < 2 + per_image:
        raise ValueError(f"a row of {length} tokens in {docs} documents leaves no room for one image "
                         f"({2 + per_image} tokens); use a longer row or fewer --row-docs")
    gen = torch.Generator().manual_seed(seed)
    samples, left = [], length
    for d in range(docs):
        size = share if d < docs - 1 else left
        images = (size - 2) // per_image
        samples.append(document(provider, images, text_per_image, size - 2 - images * per_image, gen))
        left -= size
    return samples


def step_batch(provider: Any, job: Job, args: argparse.Namespace, seed: int) -> MimoBatch:
    """One step's batch: a packed row of `job.length` tokens per language replica (samples in replica order)."""
    samples = [s for r in range(job.dp)
               for s in packed_documents(provider, job.length, args.row_docs, args.text_per_image, seed * 97 + r)]
    return MimoBatch.collate(samples, pad_id=0)


def replicate_encoder(model: Any, cp: int) -> None:
    """Megatron's encoder work under CP, as a benchmark variant: this rank's encoder runs on its images repeated
    `cp` times in one call and keeps the first copy's output (the backward still runs over the whole call)."""
    encoder = unwrap(model.modality_submodules[IMAGES]).encoder
    original = encoder.forward

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return original(torch.cat([x] * cp))[: x.shape[0]]

    encoder.forward = types.MethodType(forward, encoder)


def simulate_capacity(job: Job, capacity: int | None) -> None:
    """The dry run's stand-in for a GPU's memory (no GPU here): a row beyond `capacity` tokens per rank raises
    torch.OutOfMemoryError, as the allocator would, before the step."""
    if capacity is not None and job.length // job.cp > capacity:
        raise torch.OutOfMemoryError(f"simulated: {job.length // job.cp} tokens per rank > capacity {capacity}")


def run_job(device: torch.device, job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Build the run, take warm-up and timed steps (and the encoder's timed step), return rank 0's record."""
    config = run_config(job, args)
    provider = shaped(plan_model(config).provider_on(device), args.layers, job.length)
    model = provider.provide_distributed_model(config.distributed_config)
    if job.replicate_encoder:
        replicate_encoder(model, job.cp)
    trainer = build_trainer(config, provider, model, device)
    clock = Clock(device)
    pinned = (lambda b: b.pin_memory()) if device.type == "cuda" else (lambda b: b)  # as `mimo train`'s loader
    fixed = None if job.curve else pinned(step_batch(provider, job, args, args.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, losses, spent = [], [], 0.0
    t_start = time.perf_counter()
    for step in range(job.warmup + job.steps):
        batch = fixed if fixed is not None else pinned(step_batch(provider, job, args, step))  # drawn untimed
        simulate_capacity(job, args.simulate_capacity)
        clock.sync()
        t0 = time.perf_counter()
        result = trainer.train_step(batch)
        clock.sync()
        wall = slowest(time.perf_counter() - t0, device)  # every rank the same: the same decision below
        spent += wall
        losses.append(result.loss)
        if step >= job.warmup:
            walls.append(wall)
            if not job.curve and spent + wall > args.job_budget_s:  # a slow row times fewer steps, said below
                break
    out = {"name": job.name, "cp": job.cp, "dp": job.dp, "world": job.world, "length": job.length,
           "layers": args.layers, "steps": len(walls), "warmup": job.warmup, "losses": losses,
           "wall_s": time.perf_counter() - t_start}
    step_s = sum(walls) / len(walls)
    out.update(step_s=step_s, tokens_per_s_per_gpu=job.length * job.dp / step_s / job.world)
    if job.time_encoder:
        out["encoder_ms"], out["encoded_images"] = encoder_ms(model, trainer, fixed, clock, device)
    peaks: list[Any] = [None] * job.world
    dist.all_gather_object(peaks, peak_memory_gb())
    out["peak_gb"] = max(p or 0.0 for p in peaks)
    return out


def encoder_ms(model: Any, trainer: Any, batch: MimoBatch, clock: Clock, device: torch.device
               ) -> tuple[float, int]:
    """The encoder's forward + backward ms on one more step (llava_speed's ModuleTimer) and the images its
    blocks ran on, each the slowest or busiest rank's."""
    sub = unwrap(model.modality_submodules[IMAGES])
    lm = unwrap(model.language_model)
    timer = ModuleTimer(ModuleParts(sub.encoder, sub.projection, lm, lm, lambda out: out[0]), clock)
    images: list[int] = []
    counter = sub.encoder.encoder.register_forward_pre_hook(lambda _m, args: images.append(args[0].shape[0]))
    trainer.train_step(batch)
    clock.sync()
    ms = timer.totals_ms()["encoder"]
    timer.remove()
    counter.remove()
    return 1e3 * slowest(ms / 1e3, device), round(slowest(float(sum(images)), device))


@record
def worker(jobs: list[Job], args: argparse.Namespace, out_dir: str) -> None:
    """One world's jobs in order; each rank writes `rank<r>.json` (its records, or the out-of-memory error
    that stopped it: the rank then exits with OOM_EXIT and the agent stops the others)."""
    run_in_world(float(args.timeout), _jobs, jobs, args, Path(out_dir))


def _jobs(device: torch.device, jobs: list[Job], args: argparse.Namespace, out_dir: Path) -> None:
    """`worker`'s body, in the world `run_in_world` joined."""
    rank, records = dist.get_rank(), []
    path = out_dir / f"rank{rank}.json"
    for job in jobs:
        try:
            records.append(run_job(device, job, args))
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            records.append({"name": job.name, "length": job.length, "oom": str(e).splitlines()[0][:200]})
            path.write_text(json.dumps(records))
            sys.stdout.flush()
            os._exit(OOM_EXIT)  # a peer may wait in a collective this rank never joins: end the world now
        path.write_text(json.dumps(records))
        gc.collect()  # the job's model, trainer and DDP reducer, before the next job's
        if device.type == "cuda":
            torch.cuda.empty_cache()


def out_of_memory(e: BaseException) -> bool:
    """The allocator's error, or a library's allocation failure that arrives as another RuntimeError (a CUDA
    launch, cuBLAS's workspace, NCCL's buffers)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def launch(jobs: list[Job], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run `jobs` in one fresh world (their world size); one record per job: rank 0's, or why there is none."""
    world = jobs[0].world
    out_dir = Path(tempfile.mkdtemp(prefix="cp_scaling_", dir=args.out))
    try:
        run_on_a_free_port(world, worker, (jobs, args, str(out_dir)), "forkserver", monitor_interval=0.1)
        error = None
    except ChildFailedError as e:
        error = "; ".join(f"rank {rank}: {_reason(f)}" for rank, f in sorted(e.failures.items()))
    by_rank = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    records = []
    for i, job in enumerate(jobs):
        ooms = [r[i]["oom"] for r in by_rank.values() if len(r) > i and "oom" in r[i]]
        mine = by_rank[0][i] if len(by_rank.get(0, [])) > i else None
        if ooms:
            records.append({"name": job.name, "length": job.length, "cp": job.cp, "dp": job.dp, "oom": ooms[0]})
        elif mine is not None and "oom" not in mine:
            records.append(mine)
        else:
            records.append({"name": job.name, "length": job.length, "cp": job.cp, "dp": job.dp,
                            "error": error or "no record written"})
    return records


# -- the modes -------------------------------------------------------------------------------------------------
def search_longest(cp: int, start: int, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The longest row one step of CP`cp` trains: doubling from `start` while it fits (halving first if `start`
    does not), then bisection until the bounds are within --resolution of the longest (or one --granule)."""
    probes: list[dict[str, Any]] = []
    state = {"cp": cp, "probes": probes}

    def fits(length: int) -> bool:
        t0 = time.perf_counter()
        record = launch([Job(f"longest-cp{cp}-{length}", cp=cp, length=length)], args)[0]
        record["probe_s"] = time.perf_counter() - t0
        probes.append(record)
        progress({"mode": "longest-in-progress", **state}, args)
        what = f"ok, peak {record['peak_gb']:.1f} GB" if "step_s" in record else \
            f"out of memory: {record['oom']}" if "oom" in record else f"error: {record['error']}"
        print(f"# longest CP{cp}: {length} tokens: {what}", flush=True)
        if "error" in record:  # not a memory limit: shorter rows would fail alike
            raise ProbeFailed(record["error"])
        return "step_s" in record

    try:
        good, bad, length, settled = bounds(fits, start, probes, args, deadline)
    except ProbeFailed as e:
        return {"cp": cp, "longest": None, "error": str(e), "probes": probes}
    return {"cp": cp, "longest": good, "first_failing": bad, "settled": settled,
            "capped_at_max_length": bad is None and length > args.max_length, "probes": probes}


class ProbeFailed(RuntimeError):
    """A probe failed other than by running out of memory: the search stops and says why."""


def bounds(fits: Any, start: int, probes: list[dict[str, Any]], args: argparse.Namespace, deadline: float
           ) -> tuple[int, int | None, int, bool]:
    """The search itself, its probes started before `deadline` (seconds of the call): (longest that fit, shortest
    that did not, the last length tried, whether settled)."""
    good, bad, length = 0, None, start
    while length <= args.max_length and bad is None and affordable(length, probes, args.started, deadline):
        if fits(length):
            good, length = length, length * 2
        else:
            bad = length
    while not good and bad is not None and bad // 2 // args.granule * args.granule >= args.granule:
        length = bad // 2 // args.granule * args.granule
        if not affordable(length, probes, args.started, deadline):
            break
        if fits(length):
            good = length
        else:
            bad = length
    while good and bad is not None and bad - good > max(args.granule, int(good * args.resolution)):
        mid = good + (bad - good) // 2 // args.granule * args.granule
        if mid == good or not affordable(mid, probes, args.started, deadline):
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    settled = bad is not None and bad - good <= max(args.granule, int(good * args.resolution))
    return good, bad, length, settled


def affordable(length: int, probes: list[dict[str, Any]], started: float, deadline: float) -> bool:
    """Whether a probe of `length` should still start: the call's time so far (from `started`) plus the probe's
    estimate (the longest probe yet, its step time scaled by the length squared: attention's share grows so)
    within `deadline` seconds; a search's first probe, when the time so far is. Past it the search stops where
    it is and says so (`settled` false)."""
    spent = time.perf_counter() - started
    done = [p for p in probes if "step_s" in p]
    if not done:
        return spent < deadline
    last = max(done, key=lambda p: p["length"])
    estimate = last["probe_s"] - last["step_s"] + last["step_s"] * (length / last["length"]) ** 2
    if spent + estimate > deadline:
        print(f"# longest: a {length}-token probe (about {estimate:.0f} s) would end past {deadline:.0f} s of the "
              f"call ({spent:.0f} s spent): the search stops here", flush=True)
        return False
    return True


def progress(partial: dict[str, Any], args: argparse.Namespace) -> None:
    """Every record so far and the one in progress to --json (a call cut short keeps every probe)."""
    if args.json:
        write_json(str(args.json), args.env, [*args.records, partial])


def longest(args: argparse.Namespace) -> dict[str, Any]:
    """CP1's longest from --start, then CP2's from twice CP1's (CP2 holds at least CP1's: each rank keeps half),
    or from --start where CP1 is not searched in this call (`--cps 2`)."""
    runs: dict[int, dict[str, Any]] = {}
    for i, cp in enumerate(args.cps):
        start = 2 * runs[1]["longest"] if cp == 2 and runs.get(1, {}).get("longest") else args.start
        if runs.get(1, {}).get("error"):
            break  # CP2 would fail alike
        # a search followed by another keeps CP1_SHARE of the budget: the next one's first probe is the one
        # that answers the target (CP2 at twice CP1's longest), and it has no estimate of its own yet
        share = CP1_SHARE if i + 1 < len(args.cps) else 1.0
        runs[cp] = search_longest(cp, start, args, share * args.budget_s)
    one, two = (runs.get(cp, {}).get("longest") for cp in (1, 2))
    # a search the budget stopped before a row failed found a lower bound only (CP2 often: its first probe is 2x)
    at_least = {f"cp{cp}_at_least": run.get("first_failing") is None for cp, run in runs.items() if run.get("longest")}
    return {"mode": "longest", "layers": args.layers, "dtype": args.dtype, "cp1": runs.get(1), "cp2": runs.get(2),
            "cp1_longest": one, "cp2_longest": two, "ratio": two / one if one and two else None, **at_least,
            "target": TARGETS["longest_ratio"]}


def timed(name: str, args: argparse.Namespace, **kw: Any) -> Job:
    """A job of --warmup untimed and --steps timed steps."""
    return Job(name, warmup=args.warmup, steps=args.steps, **kw)


def speed_jobs(args: argparse.Namespace, at_longest: int) -> list[Job]:
    """CP1 and CP2 at --length; CP2 and DP2 at `at_longest`."""
    return [timed("speed-cp1", args, length=args.length), timed("speed-cp2", args, cp=2, length=args.length),
            timed("speed-cp2-longest", args, cp=2, length=at_longest),
            timed("speed-dp2-longest", args, dp=2, length=at_longest)]


def speed(args: argparse.Namespace, rows: dict[str, dict[str, Any]], at_longest: int) -> dict[str, Any]:
    """CP2 over CP1 at --length, and CP2 against DP2 at CP1's longest."""
    one, cp2, cp2_long, dp2 = (rows[j.name] for j in speed_jobs(args, at_longest))
    rate = lambda r: r.get("tokens_per_s_per_gpu")  # noqa: E731
    ratio = rate(cp2) / rate(one) if rate(cp2) and rate(one) else None
    over_dp2 = rate(cp2_long) / rate(dp2) if rate(cp2_long) and rate(dp2) else None
    return {"mode": "speed", "layers": args.layers, "dtype": args.dtype, "length": args.length,
            "at_longest": at_longest, "rows": [one, cp2, cp2_long, dp2], "cp2_over_cp1": ratio,
            "target": TARGETS["speed_ratio"], "cp2_over_dp2_at_longest": over_dp2}


def encoder_jobs(args: argparse.Namespace) -> list[Job]:
    """Colocated images DP2 + LM CP2, as mimo runs it and with every CP rank encoding CP times its share."""
    return [timed("encoder-colocated-cp2", args, cp=2, colocated=True, length=args.length, time_encoder=True),
            timed("encoder-replicated-cp2", args, cp=2, colocated=True, length=args.length, time_encoder=True,
                  replicate_encoder=True)]


def encoder(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Colocated images DP2 + LM CP2: images encoded once, against each CP rank encoding all."""
    once, everyone = (rows[j.name] for j in encoder_jobs(args))
    a, b = once.get("encoder_ms"), everyone.get("encoder_ms")
    return {"mode": "encoder", "layers": args.layers, "dtype": args.dtype, "length": args.length,
            "rows": [once, everyone], "encoder_ms_per_gpu": a, "replicated_encoder_ms_per_gpu": b,
            "ratio": a / b if a and b else None, "target": TARGETS["encoder_ratio"],
            "replicated_means": "each CP rank encodes its share repeated CP times in one call (Megatron-LM: every "
                                "CP rank encodes the micro-batch's whole image set)"}


def curves_jobs(args: argparse.Namespace) -> list[Job]:
    """--curves steps at CP1 and at CP2, each step on its own data."""
    return [Job(f"curves-cp{cp}", cp=cp, length=args.length, steps=args.curves, curve=True) for cp in (1, 2)]


def curves(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """N steps of CP2 and CP1 from one seed on the same batches; the last 50 steps' mean loss compared."""
    one, two = (rows[j.name] for j in curves_jobs(args))
    tail = min(CURVE_TAIL, args.curves)
    done = "losses" in one and "losses" in two
    means = [sum(r["losses"][-tail:]) / tail if "losses" in r else None for r in (one, two)]
    rel = abs(means[1] - means[0]) / abs(means[0]) if done else None
    worst = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"], strict=True)) if done else None
    return {"mode": "curves", "layers": args.layers, "dtype": args.dtype, "length": args.length,
            "steps": args.curves, "tail": tail, "rows": [one, two], "cp1_tail_mean": means[0],
            "cp2_tail_mean": means[1], "relative_difference": rel, "max_step_relative_difference": worst,
            "target": TARGETS["curves_rel"]}


def run_pooled(jobs: list[Job], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every job of the timed modes, one world per world size (each world starts cold: jobs of one size share
    it, in order); the records by job name."""
    rows: dict[str, dict[str, Any]] = {}
    for world in sorted({j.world for j in jobs}):
        # shortest rows first: an out-of-memory error ends its world, and the longest rows are at the edge
        mine = sorted((j for j in jobs if j.world == world), key=lambda j: j.length)
        rows.update((r["name"], r) for r in launch(mine, args))
    return rows


def summary(record: dict[str, Any]) -> str:
    """One line per mode against its target."""
    mode = record["mode"]
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}g}"  # noqa: E731
    if mode == "longest":
        bound = lambda cp: ">= " if record.get(f"cp{cp}_at_least") else ""  # noqa: E731
        return (f"longest ({record['dtype']}, full recompute, {record['layers']} layers): CP1 {bound(1)}"
                f"{record['cp1_longest']} tokens, CP2 {bound(2)}{record['cp2_longest']}: {f(record['ratio'])}x "
                f"(target >= {record['target']}; a bound where the time budget stopped the search before a row "
                f"failed)")
    if mode == "speed":
        rows = record["rows"]
        return (f"speed at {record['length']}: CP1 {f(rows[0].get('tokens_per_s_per_gpu'), 5)}, CP2 "
                f"{f(rows[1].get('tokens_per_s_per_gpu'), 5)} tokens/s/GPU: {f(record['cp2_over_cp1'])}x (target >= "
                f"{record['target']}); at {record['at_longest']}: CP2 over DP2 {f(record['cp2_over_dp2_at_longest'])}x")
    if mode == "encoder":
        return (f"encoder ms/step/GPU at {record['length']}: images DP2 + LM CP2 {f(record['encoder_ms_per_gpu'])}, "
                f"every CP rank all images {f(record['replicated_encoder_ms_per_gpu'])}: {f(record['ratio'])}x "
                f"(target <= {record['target']})")
    return (f"curves, {record['steps']} steps at {record['length']}: last-{record['tail']} mean loss CP1 "
            f"{f(record['cp1_tail_mean'], 6)}, CP2 {f(record['cp2_tail_mean'], 6)}: relative "
            f"{f(record['relative_difference'])} (target <= {record['target']})")


# -- the command line ------------------------------------------------------------------------------------------
DRY_RUN = {"device": "cpu", "preset": "tiny", "layers": 2, "granule": 8, "start": 64, "max_length": 512,
           "resolution": 1.0, "length": 64, "warmup": 0, "steps": 1, "text_per_image": 4, "row_docs": 2,
           "simulate_capacity": 64, "dtype": "float32"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, its defaults (the dry run's first), checked: a bad value is one line before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--longest", action="store_true", help="CP1's and CP2's longest row (one step each probe)")
    parser.add_argument("--speed", action="store_true", help="tokens/s/GPU: CP2 vs CP1, CP2 vs DP2 at the longest")
    parser.add_argument("--encoder", action="store_true", help="encoder ms/GPU: images DP2 vs every CP rank all")
    parser.add_argument("--curves", type=int, default=0, metavar="N", help="N steps of CP2 vs CP1, same seed")
    parser.add_argument("--dry-run", action="store_true", help="all four on CPU (gloo, tiny, 2 layers, short rows)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--preset", default=None, help="LLaVA preset (default llava-1.5-7b; tiny with --dry-run)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; the encoder is whole)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="compute (default bf16)")
    parser.add_argument("--granule", type=int, default=None, help="row lengths are multiples of this (default 1024)")
    parser.add_argument("--start", type=int, default=None, help="--longest's first row length (default 16384)")
    parser.add_argument("--max-length", type=int, default=None, help="--longest stops doubling here (default 1M)")
    parser.add_argument("--resolution", type=float, default=None, help="bisection stops within this fraction "
                        "of the longest found (default 0.05)")
    parser.add_argument("--length", type=int, default=None, help="--speed/--encoder/--curves row length "
                        "(default 16384)")
    parser.add_argument("--at-longest", type=int, default=None, help="--speed's CP2-vs-DP2 length (default: "
                        "--longest's CP1 result in this run, else --length)")
    parser.add_argument("--row-docs", type=int, default=None, help="documents packed in a row (default 4)")
    parser.add_argument("--text-per-image", type=int, default=None, help="text tokens after each image "
                        "(default 32)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--simulate-capacity", type=int, default=None, help="CPU only: tokens per rank beyond "
                        "which a probe raises torch.OutOfMemoryError (the dry run's stand-in for GPU memory)")
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="--longest's CP sizes, "
                        "in order (default 1 2; CP2 starts at twice CP1's longest when both run)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="--longest starts no probe it expects to end "
                        "past this many seconds of the call (default 540: one 10-minute device call)")
    parser.add_argument("--job-budget-s", type=float, default=120.0, help="a timed row stops after the step that "
                        "brings its steps past this many seconds (at least one timed step; --curves rows never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout per rank, seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/cp_scaling"), help="scratch and run directory")
    parser.add_argument("--json", type=Path, default=None, help="every record and the environment")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.longest = args.speed = args.encoder = True
        args.curves = args.curves or 2
        for key, value in DRY_RUN.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    defaults = {"preset": "llava-1.5-7b", "layers": 4, "dtype": "bfloat16", "granule": 1024, "start": 16384,
                "max_length": 1 << 20, "resolution": 0.05, "length": 16384, "warmup": 2, "steps": 5, "row_docs": 4,
                "text_per_image": 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (args.longest or args.speed or args.encoder or args.curves):
        parser.error("nothing to run: give --longest, --speed, --encoder, --curves N or --dry-run")
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error(f"--device cuda: CP2 needs 2 GPUs, {torch.cuda.device_count()} visible")
    if args.simulate_capacity is not None and args.device != "cpu":
        parser.error("--simulate-capacity stands in for GPU memory on CPU only; on CUDA the allocator decides")
    if args.start % args.granule or args.layers < 1:
        parser.error(f"--start {args.start} must be a multiple of --granule {args.granule}, --layers >= 1")
    try:
        tokens = LlavaMimoProvider.preset(args.preset).vision_config.tokens_per_image
    except ProviderError as e:
        parser.error(f"--preset: {e}")
    shortest = args.row_docs * (2 + tokens + args.text_per_image)  # one image a document
    for name in ("length", "at_longest", "start"):
        value = getattr(args, name)
        if value is not None and value < shortest:
            parser.error(f"--{name.replace('_', '-')} {value}: a row of {args.row_docs} documents of at least one "
                         f"{tokens}-token image and {args.text_per_image} text tokens needs >= {shortest} tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    args.started = time.perf_counter()
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """--longest first (its CP1 result is --speed's default long row), then the timed modes' jobs pooled."""
    args = parse_args(argv)
    env = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(),
           "device": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
                      else f"CPU ({os.cpu_count()} cores)"),
           "backend": "nccl" if args.device == "cuda" else "gloo", "preset": args.preset, "layers": args.layers,
           "dtype": args.dtype, "recompute": "full", "row_docs": args.row_docs, "text_per_image": args.text_per_image,
           "nccl_env": {k: os.environ.get(k) for k in NCCL_VARS},
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),  # llava_speed's default: expandable segments
           "functional_dry_run": args.device == "cpu"}
    print("# cp_scaling: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "command"), flush=True)
    args.env, args.records = env, []
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "mimo.training.loop"])
    records: list[dict[str, Any]] = args.records
    if args.longest:
        records.append(longest(args))
        report(records, env, args)
    length = at_longest(records, args)
    modes = [(args.speed, speed_jobs(args, length), lambda rows: speed(args, rows, length)),
             (args.encoder, encoder_jobs(args), lambda rows: encoder(args, rows)),
             (bool(args.curves), curves_jobs(args) if args.curves else [], lambda rows: curves(args, rows))]
    modes = [(jobs, finish) for wanted, jobs, finish in modes if wanted]
    if modes:
        rows = run_pooled([j for jobs, _ in modes for j in jobs], args)
        for _, finish in modes:
            records.append(finish(rows))
            report(records, env, args)
    return records


def report(records: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> None:
    """The newest record's line against its target; every record so far to --json (a run cut short keeps them)."""
    print("# " + summary(records[-1]), flush=True)
    if args.json:
        write_json(str(args.json), env, records)


def at_longest(records: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """--at-longest, else this run's CP1 longest, else --length."""
    found = next((r["cp1_longest"] for r in records if r["mode"] == "longest" and r["cp1_longest"]), None)
    return args.at_longest or found or args.length


if __name__ == "__main__":
    main()
