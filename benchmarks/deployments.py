"""One LLaVA model, one global batch, every deployment: homogeneous, colocated and heterogeneous, side by side.

    python benchmarks/deployments.py --gpus 8 --preset 1b --workload encoder-heavy --steps 10
    python benchmarks/deployments.py --gpus 4 --preset 1b --workload text-heavy --steps 10
    python benchmarks/deployments.py --dry-run        # CPU, gloo, tiny preset, 2 steps, worlds of 4 at most (CI)

Each row of `LAYOUTS[--gpus]` is one deployment: an image-encoder layout and a language-model layout. Every
deployment is its own world (an N+1 deployment needs one more rank than its N-rank baseline), started with
`torch.distributed.launcher.api.elastic_launch` the way `mimo train` starts its workers (`mimo.launch`). The
workers build the run exactly as `mimo train` does (`parse_run_config`, `plan_model(config).provider_on(device)`,
`provide_distributed_model(config.distributed_config)`, `build_trainer`) and draw the same global batches from a
`SyntheticDataset` (`--workload`: images per sample and sequence length), run `--warmup` + `--steps` steps,
then (heterogeneous rows) time the bridge against a plain point-to-point send between the same two ranks.
Rank 0 writes the row (`OUT/<deployment>/result.json`, plus `metrics.jsonl` for `mimo plot`); this process
collects the rows into one table (`OUT/deployments.json`, `OUT/deployments.md`).

What a row reports (timed steps only; per step the slowest rank, then the mean over steps):
- step s: `StepResult.seconds["step"]`; tokens/s = global batch × sequence length / step s (every position
  of every sequence, image tokens included); tokens/s/GPU divides by the deployment's world (active GPUs);
  TFLOP/s/GPU counts `mimo.flops.batch_flops`.
- encoder busy s: the encoder's forward (the `images.forward` phase less the time blocked in the bridge) plus
  its backward compute (autograd hooks: from the gradient reaching the encoder's output to the last
  encoder gradient accumulated), on the slowest encoder rank. language busy s likewise (the
  `language.forward_backward` phase less blocked time, less the encoder backward where that runs inside it).
- images / language wait s: on each module's slowest rank, the time blocked waiting on other ranks: in the
  bridge's receives and broadcasts (heterogeneous) or its collectives (colocated), and in the step's two
  world-wide agreements (label count at the start, loss at the end).
- encoder share f = encoder busy / step time. For a homogeneous row this is the bound's f: moving the
  encoder to its own GPU(s) can speed the same language layout up by at most 1/(1 - f).
- bridge GB/s (heterogeneous rows): one micro-batch's embeddings forward, then their gradients back, through
  the step's own `Bridge` driven as the step drives it (every rank passes the micro-batch's token counts, so
  no counts message and no host sync; no probe wraps it), all ranks starting together after a barrier (bytes
  of the micro-batch / slowest rank's time), against one `dist.send` of the same bytes and dtype between the
  first encoder and first language leader on the bridge's forward p2p group. With several replicas on a side
  the bridge's bytes travel between several leader pairs at once, the plain send's between one pair.
On CUDA every timed region ends with `torch.cuda.synchronize()` (the step's phases too: its phase timer is
replaced by a synchronizing one), so per-phase times are device times, not host launch times. A phase's busy
time ends when its own stream is done: what it left on communication streams after that (a heterogeneous
encoder's sends, which complete only when the language rank receives) counts as its blocked time. (Before
session 8 those sends counted as encoder work: a heterogeneous row's encoder busy time and share came out too
large; the bound's f, its homogeneous baseline's, has no sends.)
Instrumentation is installed from outside (instance attributes over the trainer's and bridges' private
methods; it fails loudly if one is renamed); the training step itself is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from mimo.config import LANGUAGE
from mimo.data import GlobalBatchSampler, ModalitySpec, SyntheticDataset
from mimo.families.llava import LLAVA, LlavaMimoProvider
from mimo.flops import batch_flops
from mimo.grid import P2PGroups
from mimo.launch import _reason, run_on_a_free_port
from mimo.training.loop import build_trainer, run_in_world
from mimo.training.metrics import Clock, MetricsWriter, peak_memory_gb
from mimo.training.plan import plan_model
from mimo.training.run_config import RunConfig, parse_run_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the HF rows and the profiler summary live beside us
from hf_rows import hf_worker  # noqa: E402

IMAGES = "images"

# -- the deployments: per GPU count, the global batch, its micro-batches and one row per deployment -------------
# A module is {"tp": TP, "dp": DP, "offset": first rank}; the deployment kind follows from the spans
# (mimo.config). "baseline": the homogeneous row with the same language layout, for the 1/(1 - f) bound.
# The global batch must split into micro-batches that every DP size divides; heterogeneous rows need
# several micro-batches to overlap the encoder of micro-batch m+1 with the language model on m.
# A module may say "sp": True (sequence parallelism over its TP group; `--sequence-parallel` turns it on for
# every module with TP > 1 of every row).
# Rows may set their own "microbatches" (each deployment at its best count) and "compile". A row with "hf"
# ("single", "ddp" or "fsdp") is Hugging Face's LLaVA in a plain loop on "world" GPUs (`hf_rows.py`).
LAYOUTS: dict[int, dict[str, Any]] = {
    8: {"global_batch": 32, "microbatches": 4, "deployments": [
        {"name": "homogeneous", "images": {"tp": 2, "dp": 4}, "language": {"tp": 2, "dp": 4}},
        {"name": "colocated", "images": {"dp": 8}, "language": {"tp": 2, "dp": 4}},
        {"name": "heterogeneous-4+4", "images": {"dp": 4}, "language": {"tp": 2, "dp": 2, "offset": 4}},
        {"name": "homogeneous-4", "images": {"tp": 2, "dp": 2}, "language": {"tp": 2, "dp": 2}},
        {"name": "heterogeneous-1+4", "images": {"dp": 1}, "language": {"tp": 2, "dp": 2, "offset": 1},
         "baseline": "homogeneous-4"},
        {"name": "heterogeneous-2+4", "images": {"dp": 2}, "language": {"tp": 2, "dp": 2, "offset": 2},
         "baseline": "homogeneous-4"},
    ]},
    2: {"global_batch": 8, "microbatches": 2, "deployments": [
        {"name": "hf-1", "hf": "single", "world": 1},
        {"name": "hf-ddp", "hf": "ddp", "world": 2, "microbatches": 1},
        {"name": "hf-fsdp", "hf": "fsdp", "world": 2, "microbatches": 1},
        {"name": "homogeneous-1", "images": {"dp": 1}, "language": {"dp": 1}},
        {"name": "homogeneous-dp2", "images": {"dp": 2}, "language": {"dp": 2}, "microbatches": 1},
        {"name": "homogeneous-tp2", "images": {"tp": 2, "dp": 1}, "language": {"tp": 2, "dp": 1}, "microbatches": 4},
        {"name": "colocated", "images": {"dp": 2}, "language": {"tp": 2, "dp": 1}, "microbatches": 4},
        {"name": "homogeneous-tp2-sp", "images": {"tp": 2, "dp": 1, "sp": True},
         "language": {"tp": 2, "dp": 1, "sp": True}, "microbatches": 4},
        {"name": "colocated-sp", "images": {"dp": 2}, "language": {"tp": 2, "dp": 1, "sp": True}, "microbatches": 4},
        {"name": "heterogeneous-1+1", "images": {"dp": 1}, "language": {"dp": 1, "offset": 1}, "microbatches": 4,
         "baseline": "homogeneous-1"},
        {"name": "hf-1-compile", "hf": "single", "world": 1, "compile": True},
        {"name": "hf-ddp-compile", "hf": "ddp", "world": 2, "microbatches": 1, "compile": True},
        # HF + DDP with mimo's DDP settings (RESULTS.md, session 7): the HF side at its best
        {"name": "hf-ddp-compile-tuned", "hf": "ddp", "world": 2, "microbatches": 1, "compile": True,
         "ddp_tuned": True},
        {"name": "homogeneous-1-compile", "images": {"dp": 1}, "language": {"dp": 1}, "compile": True},
        {"name": "homogeneous-dp2-compile", "images": {"dp": 2}, "language": {"dp": 2}, "microbatches": 1,
         "compile": True},
        # FSDP2 beside DDP (a row's "fsdp": its reshard policy): "never" gathers each block once a step (ZeRO-2's
        # traffic) and runs the optimizer on half the parameters per GPU
        {"name": "homogeneous-dp2-fsdp-compile", "images": {"dp": 2}, "language": {"dp": 2}, "microbatches": 1,
         "compile": True, "fsdp": "default"},
        {"name": "homogeneous-dp2-fsdp-never-compile", "images": {"dp": 2}, "language": {"dp": 2},
         "microbatches": 1, "compile": True, "fsdp": "never"},
        {"name": "homogeneous-tp2-compile", "images": {"tp": 2, "dp": 1}, "language": {"tp": 2, "dp": 1},
         "microbatches": 4, "compile": True},
        {"name": "colocated-compile", "images": {"dp": 2}, "language": {"tp": 2, "dp": 1}, "microbatches": 4,
         "compile": True},
        {"name": "homogeneous-tp2-sp-compile", "images": {"tp": 2, "dp": 1, "sp": True},
         "language": {"tp": 2, "dp": 1, "sp": True}, "microbatches": 4, "compile": True},
        {"name": "colocated-sp-compile", "images": {"dp": 2}, "language": {"tp": 2, "dp": 1, "sp": True},
         "microbatches": 4, "compile": True},
        # "overlap": tp_comm_overlap, torch's asynchronous TP (CUDA only: a CPU dry run skips these rows)
        {"name": "homogeneous-tp2-sp-overlap-compile", "images": {"tp": 2, "dp": 1, "sp": True, "overlap": True},
         "language": {"tp": 2, "dp": 1, "sp": True, "overlap": True}, "microbatches": 4, "compile": True},
        {"name": "colocated-sp-overlap-compile", "images": {"dp": 2},
         "language": {"tp": 2, "dp": 1, "sp": True, "overlap": True}, "microbatches": 4, "compile": True},
        {"name": "heterogeneous-1+1-compile", "images": {"dp": 1}, "language": {"dp": 1, "offset": 1},
         "microbatches": 4, "compile": True, "baseline": "homogeneous-1-compile"},
        # 2 micro-batches of 4 samples: a longer pipeline fill and drain, but the language rank was host-bound at
        # 4 of 2 (session 5: busy 0.663 s against 0.603 s at 2 of 4)
        {"name": "heterogeneous-1+1-mb2-compile", "images": {"dp": 1}, "language": {"dp": 1, "offset": 1},
         "microbatches": 2, "compile": True, "baseline": "homogeneous-1-compile"},
    ]},
    4: {"global_batch": 16, "microbatches": 4, "deployments": [
        {"name": "homogeneous", "images": {"tp": 2, "dp": 2}, "language": {"tp": 2, "dp": 2}},
        {"name": "colocated", "images": {"dp": 4}, "language": {"tp": 2, "dp": 2}},
        {"name": "heterogeneous-2+2", "images": {"dp": 2}, "language": {"tp": 2, "dp": 1, "offset": 2}},
        {"name": "homogeneous-2", "images": {"tp": 2, "dp": 1}, "language": {"tp": 2, "dp": 1}},
        {"name": "heterogeneous-1+2", "images": {"dp": 1}, "language": {"tp": 2, "dp": 1, "offset": 1},
         "baseline": "homogeneous-2"},
    ]},
}

# images per sample and sequence length (image tokens + text); `tiny_seq_len` for the tiny preset (16 tokens
# per 8 px image, max_seq_len 256). At 336 px an image is 576 tokens: encoder-heavy is 2304 image + 768 text.
WORKLOADS: dict[str, dict[str, int]] = {
    "encoder-heavy": {"images_per_sample": 4, "seq_len": 3072, "tiny_seq_len": 96},
    "text-heavy": {"images_per_sample": 1, "seq_len": 4096, "tiny_seq_len": 256},
}

TARGETS = {"non_homogeneous_speedup": 1.3, "bound_fraction": 0.9, "bridge_fraction": 0.8, "dp2_scaling": 1.85,
           "over_hf": 1.3, "colocated_over_tp2": 1.3}


# -- the run config of one deployment ---------------------------------------------------------------------------
def parallelism(row: dict[str, Any], sequence_parallel: bool = False) -> dict[str, dict[str, Any]]:
    """The `parallelism` section of `mimo train` for a table row (images first: the global group order); an HF
    row's world as a DP layout (its config carries only the batch, schedule and data). `sequence_parallel`
    (`--sequence-parallel`) turns it on for every module with TP > 1."""
    if "hf" in row:
        return {module: {"data_parallel_size": row["world"]} for module in (IMAGES, LANGUAGE)}
    out = {}
    for module in (IMAGES, LANGUAGE):
        m = row[module]
        out[module] = {"tensor_model_parallel_size": m.get("tp", 1), "data_parallel_size": m["dp"],
                       "rank_offset": m.get("offset", 0),
                       "sequence_parallel": is_sequence_parallel(m, sequence_parallel),
                       "tp_comm_overlap": m.get("overlap", False)}
    return out


def is_sequence_parallel(module: dict[str, Any], everywhere: bool) -> bool:
    """A table module is sequence-parallel if it says "sp", or with `--sequence-parallel` wherever TP > 1."""
    return bool(module.get("sp", False) or (everywhere and module.get("tp", 1) > 1))


def run_config_dict(row: dict[str, Any], args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The whole `mimo train` config of one deployment (checked by `parse_run_config` before launching)."""
    return {
        "model": {"preset": args.preset},
        "parallelism": parallelism(row, args.sequence_parallel),
        "distributed": {m: distributed_of(row, args) for m in (IMAGES, LANGUAGE)},
        "train": {"steps": args.warmup + args.steps, "global_batch_size": args.batch,
                  "num_microbatches": microbatches_of(row, args), "lr": args.lr, "warmup_steps": 0,
                  "clip_grad": 1.0, "seed": args.seed, "dtype": args.dtype, "timeout_s": float(args.timeout),
                  "compile": row.get("compile", args.compile)},
        "data": {"name": "synthetic", "num_samples": args.batch * (args.warmup + args.steps),
                 "items_per_sample": [args.images]},
        "log": {"dir": str(run_dir), "interval": 1},
        "eval": {"enabled": False},
    }


def distributed_of(row: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    """A module's `distributed` section: the row's "fsdp" (FSDP2 with that reshard policy), else --data-parallel
    (and --reshard-after-forward with fsdp)."""
    if "fsdp" in row:
        return {"data_parallel": "fsdp", "reshard_after_forward": row["fsdp"]}
    if args.data_parallel == "fsdp":
        return {"data_parallel": "fsdp", "reshard_after_forward": args.reshard_after_forward}
    return {"data_parallel": args.data_parallel}


def microbatches_of(row: dict[str, Any], args: argparse.Namespace) -> int:
    """--microbatches if given, else the row's own count, else the table's."""
    return args.microbatches_override or row.get("microbatches") or LAYOUTS[args.gpus]["microbatches"]


def make_dataset(provider, config, images: int, seq_len: int) -> SyntheticDataset:
    """The synthetic dataset of `mimo.training.plan.RunPlan.dataset`, with `images` images and text filling each
    sample to `seq_len` tokens (bos, filler, then per image its tokens, query, answer, filler; eos)."""
    tokens = provider.vision_config.tokens_per_image
    text = (seq_len - 2 - images * (tokens + 2)) // (images + 1)
    if text < 0:
        raise ValueError(f"--seq-len {seq_len} cannot hold {images} images of {tokens} tokens")
    spec = ModalitySpec.image(provider.image_token_id, tokens, size=provider.vision_config.image_size,
                              channels=provider.vision_config.num_channels)
    vocab = provider.language_config.vocab_size - 1  # the last id is the image token of the HF rows' LLaVA
    return SyntheticDataset(config.data.num_samples, {IMAGES: spec}, vocab_size=vocab,
                            items_per_sample=(images,), text_length=(text, text), seed=config.train.seed)


# -- instrumentation (installed from outside the step) ----------------------------------------------------------
class Probe:
    """Per-rank times the step does not report by itself: synchronized phases, time blocked on other ranks,
    and the encoder's backward compute."""

    # bridge methods that block on the other side: heterogeneous receives and TP broadcasts; colocated collectives
    BLOCKING = {"heterogeneous": ("_recv", "_broadcast"), "colocated": ("_colocated_forward", "_colocated_backward")}

    def __init__(self, trainer, model, device: torch.device) -> None:
        self.clock = Clock(device)
        self.bridge_kind = trainer.bridges[IMAGES].kind
        self.phase = "step"
        self.waits: dict[str, float] = defaultdict(float)
        self.spans: list[list[Any]] = []  # encoder backward per micro-batch: [start mark, end mark]
        self.installed: list[tuple[Any, str]] = []
        self.handles: list[Any] = []
        self._install(trainer, "_timed", self._timed)
        for name in ("_global_sums",):
            self._install(trainer, name, self._blocking(getattr(trainer, name)))
        for bridge in trainer.bridges.values():
            for name in self.BLOCKING.get(bridge.kind, ()):
                self._install(bridge, name, self._blocking(getattr(bridge, name)))
        if IMAGES in trainer.infra.participating_modules:
            encoder = model.modality_submodules[IMAGES]
            self.handles.append(encoder.register_forward_hook(self._encoder_output))
            for p in encoder.parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._encoder_grad))

    def _install(self, obj: Any, name: str, fn: Callable) -> None:
        if not hasattr(obj, name):  # the step or bridge changed: say so instead of measuring nothing
            raise AttributeError(f"{type(obj).__name__} has no {name}; update benchmarks/deployments.py's Probe")
        setattr(obj, name, fn)
        self.installed.append((obj, name))

    def remove(self) -> None:
        """Take the synchronizing wrappers and hooks out: the step runs as `mimo train` runs it again."""
        for obj, name in self.installed:
            delattr(obj, name)  # the instance attribute goes; the class's method shows through
        for handle in self.handles:
            handle.remove()
        self.installed, self.handles = [], []

    def _timed(self, seconds: dict[str, float], key: str, fn: Callable, *args: Any) -> None:
        """The step's phase timer, synchronized, remembering the phase for the blocked time. What the phase left
        on communication streams when its own stream is done counts as blocked: a heterogeneous encoder's sends
        finish only once the language rank posts the matching receives, and were counted as encoder work."""
        self.clock.sync()
        t0 = time.perf_counter()
        self.phase = key
        try:
            fn(*args)
        finally:
            self.clock.sync_stream()
            done = time.perf_counter()
            self.clock.sync()
            seconds[key] += time.perf_counter() - t0
            self.waits[key] += time.perf_counter() - done
            self.phase = "step"

    def _blocking(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.clock.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.clock.sync()
                self.waits[self.phase] += time.perf_counter() - t0
        return timed

    def _encoder_output(self, _module, _args, out) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._encoder_backward_starts)

    def _encoder_backward_starts(self, _grad) -> None:
        self.spans.append([self.clock.mark(), None])

    def _encoder_grad(self, _param) -> None:
        if self.spans:
            self.spans[-1][1] = self.clock.mark()

    def take(self, result, hosted: list[str]) -> dict[str, Any]:
        """This rank's record of the step just run (call after it; the step ended synchronized)."""
        self.clock.sync()
        backward = sum(self.clock.ms(a, b) for a, b in self.spans if b is not None) / 1e3
        out = {"modules": list(hosted), "bridge": self.bridge_kind, "seconds": dict(result.seconds),
               "waits": dict(self.waits), "encoder_backward_s": backward, "loss": result.loss}
        self.waits, self.spans = defaultdict(float), []
        return out


# -- the bridge against a plain send ----------------------------------------------------------------------------
def bridge_bandwidth(trainer, batch, clock: Clock, reps: int) -> dict[str, Any] | None:
    """Micro-batch 0's embeddings through the step's own heterogeneous bridge and back, driven as the step drives
    it (CPU counts, and on every rank the micro-batch's token counts from `MimoTrainer.microbatch_tokens`: no
    counts message, no host sync), and one plain send of the same bytes between the first src and dst leaders on
    the bridge's own forward p2p group; per repetition every rank starts after a barrier and the slowest rank's
    time counts (median over repetitions, after one warm-up). No probe wraps the bridge here: its synchronizing
    wrappers would add device syncs inside the transfer that the step does not have."""
    bridge = trainer.bridges[IMAGES]
    if bridge.kind != "heterogeneous":
        return None
    device, dtype, hidden = trainer.device, bridge.dtype, trainer.hidden_size
    tokens = trainer.microbatch_tokens(batch, IMAGES, 0)  # the whole micro-batch's, on the CPU
    nbytes = int(tokens.sum()) * hidden * torch.empty((), dtype=dtype).element_size()
    src_leader, dst_leader = int(bridge.src.ranks[-1, 0, 0, 0]), int(bridge.dst.ranks[0, 0, 0, 0])
    embeddings = counts = None
    if bridge.is_sender:  # this replica's share, as `_encode_microbatch` hands it over (counts stay on the CPU)
        samples = bridge.micro_batch_size // bridge.src.size("dp")
        counts = tokens[bridge.src.coord.dp * samples:(bridge.src.coord.dp + 1) * samples]
        embeddings = torch.randn(int(counts.sum()), hidden, device=device).to(dtype)
    rank = dist.get_rank()
    plain = torch.ones(int(tokens.sum()), hidden, dtype=dtype, device=device) \
        if rank in (src_leader, dst_leader) else None
    group = P2PGroups.pick(bridge.p2p_groups, backward=False)  # the channel the bridge's rows travel on

    def clocked(fn: Callable[[], Any]) -> tuple[float, Any]:
        dist.barrier()
        clock.sync()
        t0 = time.perf_counter()
        out = fn()
        clock.sync()
        return time.perf_counter() - t0, out

    def p2p() -> None:
        if rank == src_leader:
            dist.send(plain, dst_leader, group=group)
        elif rank == dst_leader:
            dist.recv(plain, src_leader, group=group)

    def forward(m: int) -> Any:  # the step: senders in `_encode_microbatch`, receivers in `receive`
        if bridge.is_sender:
            return bridge.forward(m, embeddings, counts, tokens)
        return bridge.forward(m, microbatch_tokens=tokens)

    times = []
    for i in range(1 + reps):
        m = 4096 + i  # micro-batch ids (and tags) no training step uses
        t_fwd, received = clocked(lambda m=m: forward(m))
        grad = torch.ones_like(received[0]) if received is not None else None
        t_bwd, _ = clocked(lambda m=m, grad=grad: (bridge.backward(m, grad) if bridge.is_receiver
                                                   else bridge.backward(m), bridge.wait()))
        t_p2p, _ = clocked(p2p)
        times.append((t_fwd, t_bwd, t_p2p))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, times[1:])
    slowest = [tuple(max(per_rank[i][k] for per_rank in everyone) for k in range(3)) for i in range(reps)]
    fwd, bwd, ref = (statistics.median(t[k] for t in slowest) for k in range(3))
    gbps = lambda s: nbytes / s / 1e9 if s > 0 else math.nan  # noqa: E731
    return {"bytes": nbytes, "src_leader": src_leader, "dst_leader": dst_leader, "forward_s": fwd,
            "backward_s": bwd, "p2p_s": ref, "forward_gbps": gbps(fwd), "backward_gbps": gbps(bwd),
            "p2p_gbps": gbps(ref), "fraction_of_p2p": min(gbps(fwd), gbps(bwd)) / gbps(ref)}


# -- a worker: one rank of one deployment -----------------------------------------------------------------------
@record
def _worker(spec: dict[str, Any]) -> None:
    """Build the run as `mimo train` does; warm-up and timed steps exactly as it runs them, then a few probed
    steps for the per-module breakdown, a profiled step if asked, the bridge; rank 0 writes the row."""
    config = parse_run_config(spec["config"])
    run_in_world(config.train.timeout_s, _row, spec, config)


def _row(device: torch.device, spec: dict[str, Any], config: RunConfig) -> None:
    """`_worker`'s body, in the world `run_in_world` set up (the trainer freed before its groups)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    provider = plan_model(config).provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    trainer = build_trainer(config, provider, model, device)
    dataset = make_dataset(provider, config, spec["images"], spec["seq_len"])
    sampler = GlobalBatchSampler(len(dataset), config.train.global_batch_size, config.train.seed)
    clock = Clock(device)
    hosted = list(trainer.infra.participating_modules)
    writer = MetricsWriter(config.run_dir, enabled=rank == 0)
    walls, losses, flops = [], [], None

    def next_batch() -> Any:  # drawn (and pinned, as `mimo train`'s loader does) outside the timed step
        batch = dataset.batch(next(sampler), seq_len=spec["seq_len"])
        return batch.pin_memory() if device.type == "cuda" else batch

    for step in range(config.train.steps):
        batch = next_batch()
        flops = flops or batch_flops(provider, batch, LLAVA.modality_flops(provider))
        clock.sync()
        t0 = time.perf_counter()
        result = trainer.train_step(batch)
        clock.sync()
        wall = slowest(time.perf_counter() - t0, device)
        losses.append(result.loss)
        if rank == 0:
            writer.log_step(step + 1, dataclasses.replace(result, seconds={**result.seconds, "step": wall}),
                            flops=flops, extra={"deployment": spec["name"]})
        if step >= spec["warmup"]:
            walls.append(wall)
    probe = Probe(trainer, model, device)
    probed = []
    for _ in range(spec["probe_steps"]):
        result = trainer.train_step(next_batch())
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, probe.take(result, hosted))
        probed.append(everyone)
    probe.remove()
    profile = None
    if spec["profile"]:
        from step_profile import describe, profile_step

        batch = next_batch()
        trace = Path(spec["result"]).parent / "trace_rank0.json.gz" if spec["trace"] and rank == 0 else None
        profile = profile_step(lambda: trainer.train_step(batch), trace)
        if rank == 0:
            print(f"# {spec['name']} profile, rank 0: {describe(profile)}", flush=True)
    bridge = bridge_bandwidth(trainer, batch, clock, spec["bridge_reps"])
    memory: list[Any] = [None] * world
    dist.all_gather_object(memory, peak_memory_gb())
    if rank == 0:
        tokens = config.train.global_batch_size * spec["seq_len"]
        row = summarize(spec, walls, probed, world, tokens, flops, trainer.bridges[IMAGES].kind, bridge)
        row.update(losses=losses, peak_memory_gb=max(memory), deployment=str(trainer.infra.deployment),
                   profile=profile, microbatches=config.train.num_microbatches, compile=config.train.compile)
        Path(spec["result"]).write_text(json.dumps(row, indent=1))
    dist.barrier()
    writer.close()


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds` (a world all-reduce)."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def merge_step(everyone: list[dict[str, Any]]) -> dict[str, Any]:
    """One step over all ranks: each phase on its slowest rank, each module's busy and blocked time."""
    seconds: dict[str, float] = {}
    for r in everyone:
        for key, value in r["seconds"].items():
            seconds[key] = max(seconds.get(key, 0.0), value)
    # homogeneous: the encoder's backward runs inside the language phase (autograd stays connected)
    inside_language = everyone[0]["bridge"] == "homogeneous"

    def worst(module: str, fn: Callable[[dict[str, Any]], float]) -> float:
        return max((fn(r) for r in everyone if module in r["modules"]), default=0.0)

    def busy_encoder(r: dict[str, Any]) -> float:
        key = f"{IMAGES}.forward"
        return r["seconds"].get(key, 0.0) - r["waits"].get(key, 0.0) + r["encoder_backward_s"]

    def busy_language(r: dict[str, Any]) -> float:
        key = f"{LANGUAGE}.forward_backward"
        inside = r["encoder_backward_s"] if inside_language and IMAGES in r["modules"] else 0.0
        return r["seconds"].get(key, 0.0) - r["waits"].get(key, 0.0) - inside

    return {"seconds": seconds,
            "busy": {IMAGES: worst(IMAGES, busy_encoder), LANGUAGE: worst(LANGUAGE, busy_language)},
            "waits": {m: worst(m, lambda r: sum(r["waits"].values())) for m in (IMAGES, LANGUAGE)}}


def summarize(spec: dict[str, Any], walls: list[float], timed: list[list[dict[str, Any]]], world: int,
              tokens: int, flops: int, kind: str, bridge: dict[str, Any] | None) -> dict[str, Any]:
    """A deployment's row: its speed from the timed steps' wall times (slowest rank each), its per-module
    breakdown from the probed steps (each merged over ranks, then averaged over steps)."""
    steps = [merge_step(everyone) for everyone in timed]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    phases = {k: mean([s["seconds"].get(k, 0.0) for s in steps]) for k in steps[0]["seconds"]}
    step_s = mean(walls)
    busy = {m: mean([s["busy"][m] for s in steps]) for m in (IMAGES, LANGUAGE)}
    waits = {m: mean([s["waits"][m] for s in steps]) for m in (IMAGES, LANGUAGE)}
    per_rank = []
    for rank in range(world):
        records = [everyone[rank] for everyone in timed]
        keys = dict.fromkeys(k for r in records for k in r["seconds"])
        per_rank.append({"rank": rank, "modules": records[0]["modules"],
                         "seconds": {k: mean([r["seconds"].get(k, 0.0) for r in records]) for k in keys},
                         "wait_s": mean([sum(r["waits"].values()) for r in records]),
                         "encoder_backward_s": mean([r["encoder_backward_s"] for r in records])})
    return {
        "name": spec["name"], "world": world, "bridge": kind, "layouts": spec["layouts"],
        "baseline": spec.get("baseline"), "timed_steps": len(walls), "probed_steps": len(steps),
        "tokens_per_step": tokens,
        "step_s": step_s, "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
        "tflops_per_gpu": flops / step_s / world / 1e12, "step_tflop": flops / 1e12,
        "phases_s": phases, "busy_s": busy, "wait_s": waits, "encoder_share": busy[IMAGES] / phases["step"],
        "bridge_bandwidth": bridge, "ranks": per_rank,
    }


# -- the parent: one world per deployment, one table ------------------------------------------------------------
def launch_world(nproc: int, spec: dict[str, Any]) -> str | None:
    """Run the row's worker (`_worker`, or `hf_worker` for an HF row) on `nproc` local processes as
    `mimo.launch` does; None, or why it failed."""
    try:
        run_on_a_free_port(nproc, hf_worker if "hf" in spec else _worker, (spec,), "forkserver",
                           monitor_interval=0.1)
    except ChildFailedError as e:
        return "; ".join(f"rank {rank}: {_reason(f)}" for rank, f in sorted(e.failures.items()))
    return None


def describe_row(row: dict[str, Any], sequence_parallel: bool = False) -> dict[str, str]:
    """Each module's layout in short, for the table (an HF row: its wrapper and world)."""
    if "hf" in row:
        what = {"single": "HF, 1 GPU", "ddp": f"HF + DDP x{row['world']}", "fsdp": f"HF + FSDP2 x{row['world']}"}
        return {IMAGES: what[row["hf"]], LANGUAGE: what[row["hf"]]}
    fsdp = f" FSDP2 ({row['fsdp']})" if "fsdp" in row else ""
    return {m: describe(row[m], sequence_parallel) + fsdp for m in (IMAGES, LANGUAGE)}


def describe(module: dict[str, Any], sequence_parallel: bool = False) -> str:
    """A table row's module layout in short: 'TP2xDP2 r1-4' ('TP2+SPxDP2 r1-4' sequence-parallel)."""
    tp, dp, start = module.get("tp", 1), module["dp"], module.get("offset", 0)
    ranks = f"r{start}-{start + tp * dp - 1}" if tp * dp > 1 else f"r{start}"
    sp = "+SP" if is_sequence_parallel(module, sequence_parallel) else ""
    overlap = "+overlap" if module.get("overlap") else ""
    return f"TP{tp}{sp}{overlap}xDP{dp} {ranks}"


def plan(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A deployment's checked plan: its `mimo train` config, world, layouts and kind; a ValueError (naming the
    deployment) for a layout, batch or sequence the run could not take, before anything is launched."""
    run_dir = args.out / row["name"]
    try:
        config = parse_run_config(run_config_dict(row, args, run_dir))
        layout = config.layout.finalize(config.world_size)
        layout.validate_batch(args.batch, microbatches_of(row, args))
        if row.get("baseline") and row["baseline"] not in {r["name"] for r in LAYOUTS[args.gpus]["deployments"]}:
            raise ValueError(f"baseline {row['baseline']!r} is not a row of the {args.gpus}-GPU table")
    except ValueError as e:
        raise ValueError(f"deployment {row['name']!r}: {e}") from None
    kind = f"hf-{row['hf']}" if "hf" in row else str(layout.deployment)
    return {"name": row["name"], "world": config.world_size, "layouts": describe_row(row, args.sequence_parallel),
            "baseline": row.get("baseline"), "deployment": kind, "config": config, "run_dir": run_dir,
            "hf": row.get("hf"), "ddp_tuned": row.get("ddp_tuned", False)}


def check_workload(args: argparse.Namespace) -> None:
    """A ValueError if the sequence cannot hold the images (or exceeds the language model's positions)."""
    provider = LlavaMimoProvider.preset(args.preset)
    tokens, limit = provider.vision_config.tokens_per_image, provider.language_config.max_seq_len
    need = 2 + args.images * (tokens + 2)
    if args.seq_len < need or args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len}: {args.images} images of {tokens} tokens need at least {need}, "
                         f"and the {args.preset} language model takes at most {limit}")


def run_deployment(p: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Launch a planned deployment's world and read back the row its rank 0 wrote (or why there is none)."""
    base = {k: p[k] for k in ("name", "world", "layouts", "baseline", "deployment")}
    if args.device == "cuda" and p["world"] > torch.cuda.device_count():
        return base | {"error": f"skipped: needs {p['world']} GPUs, {torch.cuda.device_count()} visible"}
    if args.device == "cpu" and any(m.tp_comm_overlap for m in p["config"].layout.module_parallelisms.values()):
        return base | {"error": "skipped: tp_comm_overlap needs CUDA GPUs (symmetric memory)"}
    run_dir = p["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    for stale in (result, run_dir / "metrics.jsonl", run_dir / "trace_rank0.json.gz"):
        stale.unlink(missing_ok=True)
    spec = {"name": p["name"], "config": p["config"].to_dict(), "images": args.images, "seq_len": args.seq_len,
            "warmup": args.warmup, "bridge_reps": args.bridge_reps, "result": str(result), "layouts": p["layouts"],
            "baseline": p["baseline"], "probe_steps": args.probe_steps, "profile": args.profile and not cpu_run(args),
            "trace": args.trace}
    if p["hf"]:
        spec["hf"], spec["ddp_tuned"] = p["hf"], p["ddp_tuned"]
    t0 = time.perf_counter()
    error = launch_world(p["world"], spec)
    if error is not None or not result.is_file():
        return base | {"error": error or "no result written"}
    return json.loads(result.read_text()) | {"wall_s": time.perf_counter() - t0}


def cpu_run(args: argparse.Namespace) -> bool:
    """The profiler summary reads CUDA kernels: a CPU run has none."""
    return args.device == "cpu"


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets from the rows: per-GPU gain, the N+1 bound, bridge bandwidth, loss agreement."""
    ok = [r for r in rows if "error" not in r and not is_hf(r)]
    hf = [r for r in rows if "error" not in r and is_hf(r)]
    by_name = {r["name"]: r for r in ok}
    out: dict[str, Any] = {"heterogeneous": [], "bridge": [], **against_hf(ok, hf)}
    hom = [r for r in ok if r["deployment"] == "homogeneous"]
    other = [r for r in ok if r["deployment"] != "homogeneous"]
    if hom and other:
        best_hom = max(hom, key=lambda r: r["tokens_per_s_per_gpu"])
        best = max(other, key=lambda r: r["tokens_per_s_per_gpu"])
        out["best_non_homogeneous"] = {"row": best["name"], "homogeneous": best_hom["name"],
                                       "ratio": best["tokens_per_s_per_gpu"] / best_hom["tokens_per_s_per_gpu"]}
    for r in ok:
        base = by_name.get(r.get("baseline") or "")
        if base is not None:
            f = base["encoder_share"]
            bound = 1 / (1 - f) if f < 1 else math.inf
            speedup = r["tokens_per_s"] / base["tokens_per_s"]
            out["heterogeneous"].append({"row": r["name"], "baseline": base["name"], "f": f, "bound": bound,
                                         "speedup": speedup, "fraction_of_bound": speedup / bound})
        if r.get("bridge_bandwidth"):
            out["bridge"].append({"row": r["name"], **r["bridge_bandwidth"]})
    curves = [r["losses"] for r in ok]  # mimo's rows: one model, one init (HF's rows start elsewhere)
    if len(curves) > 1 and len({len(c) for c in curves}) == 1:
        spread = [max(c[i] for c in curves) - min(c[i] for c in curves) for i in range(len(curves[0]))]
        out["loss_spread"] = {"max_abs": max(spread), "max_rel": max(s / abs(curves[0][i]) for i, s in
                                                                      enumerate(spread))}
    return out


def is_hf(row: dict[str, Any]) -> bool:
    return row["deployment"].startswith("hf-")


def against_hf(mimo: list[dict[str, Any]], hf: list[dict[str, Any]]) -> dict[str, Any]:
    """The two-GPU targets: DP scaling over one GPU, the best mimo row over the best HF row of the same GPU
    count, colocated over homogeneous TP, and each mimo row's peak memory against the HF row of its GPU count
    (the best HF row on two GPUs: the one a user would run)."""
    out: dict[str, Any] = {}
    by_name = {r["name"]: r for r in mimo}
    if "homogeneous-1" in by_name and "homogeneous-dp2" in by_name:
        out["dp2_scaling"] = by_name["homogeneous-dp2"]["tokens_per_s"] / by_name["homogeneous-1"]["tokens_per_s"]
    if "colocated" in by_name and "homogeneous-tp2" in by_name:
        out["colocated_over_tp2"] = by_name["colocated"]["tokens_per_s"] / by_name["homogeneous-tp2"]["tokens_per_s"]
    memory = []
    for world in sorted({r["world"] for r in hf}):
        best_hf = max((r for r in hf if r["world"] == world), key=lambda r: r["tokens_per_s"])
        same = [r for r in mimo if r["world"] == world]
        if same:
            best = max(same, key=lambda r: r["tokens_per_s"])
            out.setdefault("best_over_hf", []).append({"gpus": world, "row": best["name"], "hf": best_hf["name"],
                                                       "ratio": best["tokens_per_s"] / best_hf["tokens_per_s"]})
        memory += [{"row": r["name"], "gb": r["peak_memory_gb"], "hf": best_hf["name"],
                    "hf_gb": best_hf["peak_memory_gb"]} for r in same]
    out["memory"] = memory
    return out


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(rows: list[dict[str, Any]], comparison: dict[str, Any], env: dict[str, Any]) -> str:
    """The two tables and the targets, as `OUT/deployments.md` holds them."""
    hom_best = max((r["tokens_per_s_per_gpu"] for r in rows if "error" not in r and r["deployment"] == "homogeneous"),
                   default=None)
    lines = ["| deployment | kind | GPUs | images | language | step s | tokens/s | tokens/s/GPU | vs best hom. "
             "| TFLOP/s/GPU | loss (last) | peak GB |", "|" + "---|" * 12]
    for r in rows:
        head = f"| {r['name']} | {r['deployment']} | {r['world']} | {r['layouts'][IMAGES]} | {r['layouts'][LANGUAGE]}"
        if "error" in r:
            lines.append(head + f" | error: {r['error']} |" + " |" * 6)
            continue
        ratio = r["tokens_per_s_per_gpu"] / hom_best if hom_best else None
        lines.append(head + " | ".join(["", _f(r["step_s"]), _f(r["tokens_per_s"]), _f(r["tokens_per_s_per_gpu"]),
                                         _f(ratio), _f(r["tflops_per_gpu"]), _f(r["losses"][-1], 5),
                                         _f(r["peak_memory_gb"])]) + " |")
    lines += ["", "| deployment | encoder busy s | language busy s | images wait s | language wait s | encoder share f "
              "| bridge fwd GB/s | bridge bwd GB/s | p2p GB/s | bridge/p2p |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r or is_hf(r):
            continue
        b = r.get("bridge_bandwidth") or {}
        lines.append("| " + " | ".join([r["name"], _f(r["busy_s"][IMAGES]), _f(r["busy_s"][LANGUAGE]),
                                         _f(r["wait_s"][IMAGES]), _f(r["wait_s"][LANGUAGE]), _f(r["encoder_share"]),
                                         _f(b.get("forward_gbps")), _f(b.get("backward_gbps")),
                                         _f(b.get("p2p_gbps")), _f(b.get("fraction_of_p2p"))]) + " |")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "| deployment (rank 0, one step) | wall ms | GPU busy ms | idle ms | compute ms | NCCL ms "
                  "| exposed NCCL ms | copies ms | kernels |", "|" + "---|" * 9]
        for r in profiled:
            p = r["profile"]
            lines.append("| " + " | ".join([r["name"], *(_f(p[k], 4) for k in (
                "wall_ms", "gpu_busy_ms", "gpu_idle_ms", "compute_ms", "comm_ms", "comm_exposed_ms", "copy_ms")),
                str(p["kernels"])]) + " |")
    lines += ["", *target_lines(comparison, env)]
    return "\n".join(lines)


def target_lines(c: dict[str, Any], env: dict[str, Any]) -> list[str]:
    t = TARGETS
    out = []
    if "dp2_scaling" in c:
        out.append(f"- homogeneous DP2 over one GPU: {c['dp2_scaling']:.3f}x tokens/s (target >= {t['dp2_scaling']})")
    for b in c.get("best_over_hf", []):
        out.append(f"- best mimo row on {b['gpus']} GPU(s), {b['row']}, over the best HF row, {b['hf']}: "
                   f"{b['ratio']:.3f}x tokens/s (target >= {t['over_hf']} on two GPUs)")
    if "colocated_over_tp2" in c:
        out.append(f"- colocated over homogeneous TP2: {c['colocated_over_tp2']:.3f}x tokens/s "
                   f"(target >= {t['colocated_over_tp2']}, 3b encoder-heavy)")
    for m in c.get("memory", []):
        verdict = "ok" if m["gb"] <= m["hf_gb"] else "over"
        out.append(f"- peak memory {m['row']}: {m['gb']:.1f} GB against {m['hf']} {m['hf_gb']:.1f} GB ({verdict})")
    if "best_non_homogeneous" in c:
        b = c["best_non_homogeneous"]
        target = f"target >= {t['non_homogeneous_speedup']} on encoder-heavy"
        out.append(f"- best non-homogeneous tokens/s/GPU: {b['row']} = {b['ratio']:.3f}x {b['homogeneous']} ({target})")
    for h in c["heterogeneous"]:
        out.append(f"- {h['row']} vs {h['baseline']}: speed-up {h['speedup']:.3f}x, bound 1/(1-f) = {h['bound']:.3f} "
                   f"(f = {h['f']:.3f}): {100 * h['fraction_of_bound']:.0f}% of the bound "
                   f"(target >= {100 * t['bound_fraction']:.0f}%)")
    for b in c["bridge"]:
        out.append(f"- bridge {b['row']} (ranks {b['src_leader']} -> {b['dst_leader']}, {b['bytes'] / 1e6:.3g} MB): "
                   f"forward {b['forward_gbps']:.3g} GB/s, backward {b['backward_gbps']:.3g} GB/s, plain p2p "
                   f"{b['p2p_gbps']:.3g} GB/s: {100 * b['fraction_of_p2p']:.0f}% "
                   f"(target >= {100 * t['bridge_fraction']:.0f}%)")
    if "loss_spread" in c:
        s = c["loss_spread"]
        runs = " ".join(env["runs"])
        out.append(f"- losses of all deployments, step by step: max spread {s['max_abs']:.3g} "
                   f"(relative {s['max_rel']:.3g}); curves: `mimo plot {runs} --out {env['out']}/loss.png`")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help=f"the machine's GPU count: picks the layout table "
                        f"({sorted(LAYOUTS)}; default 8, 4 with --dry-run)")
    parser.add_argument("--preset", default=None, choices=["tiny", "1b", "3b", "7b"], help="LLaVA preset "
                        "(default 1b, tiny on CPU)")
    parser.add_argument("--workload", default="encoder-heavy", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--only", default="", help="comma-separated deployment names (default: every row)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the layout table's)")
    parser.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: table's)")
    parser.add_argument("--images", type=int, default=None, help="images per sample (default: the workload's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the workload's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 0 dry run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 dry run)")
    parser.add_argument("--bridge-reps", type=int, default=None, help="bridge/p2p repetitions (default 5; 1 dry run)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="float32 parameters; bfloat16 autocast (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--data-parallel", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--reshard-after-forward", default="default", choices=["default", "always", "never"],
                        help="FSDP2's policy for every module with --data-parallel fsdp (a row's \"fsdp\" wins)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every layer in every row (mimo's "
                        "train.compile; the HF rows compile theirs), unless a row says otherwise")
    parser.add_argument("--probe-steps", type=int, default=None, help="steps after the timed ones with "
                        "synchronizing probes for the per-module breakdown (default 2; 1 dry run)")
    parser.add_argument("--profile", action="store_true", help="one more step per row under the PyTorch profiler "
                        "(CUDA): GPU busy/idle, compute, exposed NCCL, copies, top kernels, in the row's JSON")
    parser.add_argument("--trace", action="store_true", help="with --profile: keep rank 0's Chrome trace "
                        "(OUT/<row>/trace_rank0.json.gz)")
    parser.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism on every module "
                        "with TP > 1 of every row (rows named -sp have it anyway): run the table twice to compare")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout per rank, seconds (a "
                        "hung deployment fails after it and the next one runs)")
    parser.add_argument("--out", default=None, help="output directory (default runs/deployments/<...>)")
    parser.add_argument("--dry-run", action="store_true", help="functional CPU run: --device cpu --preset tiny "
                        "--gpus 4 --batch 8 --microbatches 2 --warmup 0 --steps 2 --bridge-reps 1 (gloo; a "
                        "functional check, not a performance result)")
    args = parser.parse_args(argv)
    if args.dry_run:
        defaults = {"device": "cpu", "preset": "tiny", "gpus": 4, "warmup": 0, "steps": 2, "bridge_reps": 1,
                    "batch": 8, "microbatches": 2, "probe_steps": 1}
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = args.device == "cpu"
    args.gpus = args.gpus or 8
    args.preset = args.preset or ("tiny" if cpu else "1b")
    if args.gpus not in LAYOUTS:
        parser.error(f"--gpus {args.gpus}: layout tables exist for {sorted(LAYOUTS)}; add one to LAYOUTS")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --device cpu or --dry-run)")
    table, workload = LAYOUTS[args.gpus], WORKLOADS[args.workload]
    args.batch = args.batch or table["global_batch"]
    args.microbatches_override = args.microbatches
    args.microbatches = args.microbatches or table["microbatches"]
    args.images = workload["images_per_sample"] if args.images is None else args.images
    args.seq_len = args.seq_len or workload["tiny_seq_len" if args.preset == "tiny" else "seq_len"]
    args.warmup = 3 if args.warmup is None else args.warmup
    args.steps = 10 if args.steps is None else args.steps
    args.bridge_reps = 5 if args.bridge_reps is None else args.bridge_reps
    args.probe_steps = 2 if args.probe_steps is None else args.probe_steps
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if args.steps < 1 or args.bridge_reps < 1 or args.probe_steps < 1 or args.warmup < 0:
        parser.error("--steps, --bridge-reps and --probe-steps must be >= 1, --warmup >= 0")
    if args.reshard_after_forward != "default" and args.data_parallel != "fsdp":
        parser.error(f"--reshard-after-forward {args.reshard_after_forward}: FSDP2's policy, and --data-parallel is "
                     f"{args.data_parallel}; add --data-parallel fsdp")
    names = [r["name"] for r in table["deployments"]]
    args.rows = [r for r in table["deployments"] if not args.only or r["name"] in args.only.split(",")]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(names))
    if unknown:
        parser.error(f"--only: unknown deployment(s) {unknown}; the {args.gpus}-GPU table has {names}")
    args.out = Path(args.out or f"runs/deployments/{args.preset}-{args.workload}-{args.gpus}gpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(), "device": _device_name(args.device),
        "backend": "nccl" if args.device == "cuda" else "gloo", "preset": args.preset, "workload": args.workload,
        "gpus": args.gpus, "global_batch": args.batch, "microbatches": args.microbatches,
        "images_per_sample": args.images, "seq_len": args.seq_len, "dtype": args.dtype, "warmup": args.warmup,
        "steps": args.steps, "data_parallel": args.data_parallel, "out": str(args.out),
        "functional_dry_run": args.device == "cpu",
    }
    print("# deployments: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "command"), flush=True)
    try:
        check_workload(args)
        plans = [plan(row, args) for row in args.rows]
    except ValueError as e:
        print(f"deployments.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    # Workers fork from one server that has imported torch and mimo once, for every deployment's world (as
    # mimo.testing does), instead of each spawned worker importing them again; the server never touches CUDA.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "mimo.training.loop"])
    rows = []
    for p in plans:
        with _quiet_launcher():
            result = run_deployment(p, args)
        rows.append(result)
        if "error" in result:
            print(f"# {p['name']}: {result['error']}", flush=True)
        else:
            waits = result.get("wait_s", {IMAGES: 0.0, LANGUAGE: 0.0})
            print(f"# {p['name']} ({result['deployment']}, {result['world']} ranks): step {result['step_s']:.4g} s, "
                  f"{result['tokens_per_s_per_gpu']:.4g} tokens/s/GPU, images wait {waits[IMAGES]:.3g} s, "
                  f"language wait {waits[LANGUAGE]:.3g} s, {result['wall_s']:.1f} s wall", flush=True)
    comparison = compare(rows)
    env["runs"] = [str(args.out / r["name"]) for r in rows if "error" not in r]
    text = markdown(rows, comparison, env)
    header = f"# deployments: {args.preset}, {args.workload}, {args.gpus}-GPU table, {env['device']}"
    if env["functional_dry_run"]:
        header += " (CPU functional dry run: not a performance result)"
    (args.out / "deployments.md").write_text(f"{header}\n\n`{env['command']}`\n\n{text}\n")
    report = {"env": env, "rows": rows, "comparison": comparison}
    chart(rows, args.out / "tokens_per_gpu.png", header.removeprefix("# "))
    (args.out / "deployments.json").write_text(json.dumps(report, indent=1, default=str))
    print()
    print(text)
    print(f"\n# written: {args.out / 'deployments.md'}, {args.out / 'deployments.json'}", flush=True)
    return report


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A bar per row: tokens/s per GPU, HF's rows grey, mimo's blue (matplotlib, as `mimo plot` uses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if "error" not in r]
    if not done:
        return
    fig = Figure(figsize=(1.2 + 1.1 * len(done), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["#9a9a9a" if is_hf(r) else "#2f6db5" for r in done]
    bars = ax.bar([r["name"] for r in done], [r["tokens_per_s_per_gpu"] for r in done], color=colors)
    ax.bar_label(bars, labels=[f"{r['tokens_per_s_per_gpu']:,.0f}" for r in done], fontsize=8)
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextlib.contextmanager
def _quiet_launcher():
    """The elastic agent logs each start at INFO/WARNING; keep the table readable (errors still show)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.launcher")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any("error" in r for r in report["rows"]) else 0)
