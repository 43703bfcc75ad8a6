"""The training run behind `mimo train`, on every rank: build, (resume,) train, checkpoint, evaluate.

It runs inside an initialized world (its own launcher, torchrun or srun set the environment). Rank 0
writes the run directory: the resolved config, `metrics.jsonl`, the progress line and the held-out evaluation.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml

from mimo.config import LANGUAGE
from mimo.data import BatchPrefetcher, GlobalBatchSampler
from mimo.data.packing import PackedText, PaddedText, TextLayout
from mimo.data.positions import MRopePositions
from mimo.data.prefetch import default_num_workers
from mimo.distributed import static_shapes
from mimo.families.family import EvalRequest
from mimo.flops import PackedRows, batch_flops
from mimo.fp8 import FP8_MULTIPLE
from mimo.grid import group_options
from mimo.provider import MimoModelProvider
from mimo.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_model_only,
    load_weights,
    omitted_prefixes,
    open_checkpoint,
    weights_path,
)
from mimo.training.deadline import Deadline
from mimo.training.evaluate import answer_questions, held_out_loss
from mimo.training.grad_scaler import GlobalGradScaler
from mimo.training.memory_history import MemoryHistory
from mimo.training.metrics import METRICS_FILE, MetricsWriter, Progress, SkippedSamples, cut_metrics
from mimo.training.nonfinite import NonFiniteWatch
from mimo.training.optim import OptimizerConfig
from mimo.training.phase import doing, enter
from mimo.training.plan import RunPlan
from mimo.training.run_config import RunConfig
from mimo.training.run_dir import run_identity
from mimo.training.step import MimoTrainer, StepResult


def init_distributed(timeout_s: float) -> torch.device:
    """Join the world the launcher set up (NCCL with CUDA, else gloo); the device this rank computes on.

    With CUDA the device is bound at `init_process_group`, so every NCCL communicator (the world's and each
    group's) is created when its group is, never lazily inside a training step."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), pg_options=group_options(backend),
                                device_id=device if device.type == "cuda" else None)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    return device


T = TypeVar("T")


def run_in_world(timeout_s: float, body: Callable[..., T], *args: Any) -> T:
    """`body(device, *args)` between joining the world (`init_distributed`) and leaving it (`leave_world`): what
    the body built (models, DDP reducers) is freed at its return, before any process group is destroyed."""
    result = body(init_distributed(timeout_s), *args)
    leave_world()
    return result


def leave_world() -> None:
    """Destroy the process groups, garbage collected first (a model in a reference cycle outlives its function).

    A DDP reducer freed after its group was destroyed frees the group with the GIL held (torch binds the group,
    not the reducer, with a GIL-free destructor) and joins the group's gloo thread, which may be waiting for the
    GIL to free a finished collective's tensors: a deadlock (the HF benchmark rows hung so, one run in ~6)."""
    gc.collect()
    dist.destroy_process_group()


def build_trainer(config: RunConfig, provider: MimoModelProvider, model, device: torch.device) -> MimoTrainer:
    """The step runner with the run's optimizer, schedule, clipping and precision."""
    t = config.train
    precision = config.precision
    optimizer = OptimizerConfig(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                                total_steps=t.steps, min_lr_ratio=t.min_lr_ratio)
    return MimoTrainer(model, provider.build_infra(), hidden_size=provider.language_config.hidden_size,
                       global_batch_size=t.global_batch_size, num_microbatches=t.num_microbatches,
                       optimizer=optimizer, clip_grad=t.clip_grad, activation_dtype=precision.compute_dtype,
                       scaler=GlobalGradScaler() if precision.loss_scaling else None, device=device,
                       text_layout=text_layout(config, device, provider.text_positions),
                       embedding_widths=provider.embedding_widths())


def packed_rows(result: StepResult) -> PackedRows | None:
    """For the FLOP count of a step on packed rows: the positions they computed and each sample's length, as the
    step reported them (None for padded rows)."""
    return None if result.documents is None else PackedRows(result.positions, result.documents)


# a packed row's length on a GPU: flex_attention's block (few distinct lengths compile), a multiple of fp8's 16
PACKED_MULTIPLE = 128


def text_layout(config: RunConfig, device: torch.device, rule: MRopePositions | None = None) -> TextLayout:
    """`data.packing`: each micro-batch's samples end to end in one row (its length rounded up to 128 on a GPU,
    flex_attention's block, so few distinct lengths compile), else one padded row per sample (its width rounded
    up on a GPU: to 64 where the language model's compiled blocks take static shapes, each width compiling; to
    16 with fp8, whose matmuls need the token count a multiple of 16, `distributed.aligned_tokens`)."""
    if config.data.packing:
        return PackedText(multiple=PACKED_MULTIPLE if device.type == "cuda" else 1, positions_rule=rule)
    static = config.train.compile and static_shapes(config.layout.get_parallelism(LANGUAGE).tensor_model_parallel_size)
    float8 = config.distributed_config.for_module(LANGUAGE).fp8 != "none"
    multiple = math.lcm(64 if static else 1, FP8_MULTIPLE if float8 else 1)
    return PaddedText(multiple=multiple if device.type == "cuda" else 1, positions_rule=rule)


def run_training(plan: RunPlan, resume: bool = False, quiet: bool = False,
                 rank_map: str = "", resume_from: str | None = None, started: float | None = None) -> dict[str, Any]:
    """Train the planned run's `config.train.steps` steps (if `resume`: from `resume_from`, by default the newest
    checkpoint); returns the final metrics. `started`: when the run began (`time.monotonic()`, one clock for
    every process of a machine), `mimo train`'s own checks included; train.exit_duration_in_mins counts from it
    (else from now)."""
    start = time.monotonic() if started is None else started
    return run_in_world(plan.config.train.timeout_s, _train, plan, resume, quiet, rank_map, resume_from, start)


def _train(device: torch.device, plan: RunPlan, resume: bool, quiet: bool, rank_map: str,
           resume_from: str | None, start: float) -> dict[str, Any]:
    """`run_training`'s body on this rank, in the world `run_in_world` set up (the plan was checked before)."""
    config, rank = plan.config, dist.get_rank()
    memory = MemoryHistory(config.log.memory_snapshot, config.run_dir, rank, device)
    memory.start()  # before the model: its weights, gradients and optimizer state are attributed too
    with memory.watching():
        return _train_recorded(device, plan, resume, quiet, rank_map, resume_from, start, memory)


def _train_recorded(device: torch.device, plan: RunPlan, resume: bool, quiet: bool, rank_map: str,
                    resume_from: str | None, start: float, memory: MemoryHistory) -> dict[str, Any]:
    """`_train`'s work, its GPU allocator recorded as `log.memory_snapshot` asks (`memory`)."""
    config, rank = plan.config, dist.get_rank()
    provider = plan.provider_on(device)
    model = provider.provide_distributed_model(config.distributed_config)
    dataset = plan.dataset(provider)
    flops = plan.modality_flops()
    sampler = GlobalBatchSampler(len(dataset), config.train.global_batch_size, config.train.seed)
    trainer = build_trainer(config, provider, model, device)
    start_from, resuming = _start_checkpoint(config, resume, resume_from)
    checkpointer = Checkpointer(config.checkpoint_dir, keep=config.checkpoint.keep,
                                hf_parts=plan.hf_parts_from(start_from))
    skipped = SkippedSamples()
    run = run_identity(config.run_dir) if rank == 0 else None  # recorded in each checkpoint (rank 0 writes mimo.json)
    if resume and not resuming and rank == 0:
        print(f"no complete checkpoint in {checkpointer.root}; starting from step 0", flush=True)
    if resuming:
        _resume(checkpointer, trainer, sampler, skipped, rank, start_from, verified=resume_from is not None)
        memory.resumed_at(trainer.step_count)
    elif start_from is not None:
        load_weights(start_from, trainer, checkpointer.hf_parts, verify=False)  # the plan verified it (`plan_run`)
        if rank == 0 and not quiet:
            print(f"weights from {start_from} (optimizer, schedule and data start fresh)", flush=True)
    if rank == 0:  # only now, once a resume has been accepted: a refused one leaves the run directory as it was
        _write_run_dir(config, rank_map, quiet)
        if resume:
            _report_cut(cut_metrics(config.run_dir, trainer.step_count))
    writer = MetricsWriter(config.run_dir, enabled=rank == 0, tensorboard=config.log.tensorboard and rank == 0)
    progress = Progress(config.train.steps, enabled=rank == 0, quiet=quiet, initial_step=trainer.step_count)
    last: dict[str, Any] = {}
    fault = _injected_fault(rank)
    deadline = Deadline(config.train.exit_duration_in_mins, start, config.train.exit_signal_handler)
    saved = None
    diverged = NonFiniteWatch(config.train.max_nonfinite_steps)
    enter("step")  # between the waits marked below: the step's compute, its collectives, the logging
    # SIGTERM stays noted, not fatal, through the stop's checkpoint: the launcher forwards a scheduler's signal to the
    # ranks, and on a loaded machine that copy can arrive after a rank left the loop, during the save
    with deadline.watching():
        with _loader(config, dataset, sampler, device, deadline.loader_worker_init) as batches:
            for step in range(trainer.step_count, config.train.steps):
                if fault == step + 1:
                    raise RuntimeError(f"injected fault at step {step + 1} (MIMO_INJECT_FAULT)")
                t0 = time.perf_counter()
                with doing("data"):
                    batch = next(batches)
                waited = time.perf_counter() - t0
                skipped.add(batch.skipped)
                result = trainer.train_step(batch, deadline.votes)
                memory.after_step(step + 1)
                finite = diverged.finite(step + 1, result)
                result.seconds["data_wait"] = waited  # the step's time blocked on the loader (logged as data_wait_s)
                last = {"step": step + 1, "loss": result.loss, "skipped_samples": skipped.count}
                if (step + 1) % config.log.interval == 0 or step + 1 == config.train.steps:
                    result.seconds = _slowest_rank_seconds(result.seconds)
                    step_flops = batch_flops(provider, batch, flops, packed=packed_rows(result))
                    writer.log_step(step + 1, result, flops=step_flops, extra={"skipped_samples": skipped.count})
                progress.update(step + 1, result.loss, result.tokens / result.seconds["step"])
                if config.checkpoint.interval and (step + 1) % config.checkpoint.interval == 0 and finite:
                    with doing("checkpoint"):
                        saved = checkpointer.save(step + 1, trainer, _extra(sampler, skipped, config, run))
                    if step + 1 < config.train.steps and _evaluation_due(config, step + 1):
                        _evaluate(plan, saved, step + 1, writer, rank)
                diverged.check(step + 1, saved or (start_from if resuming else None))
                if step + 1 < config.train.steps and deadline.agreed(result.votes):
                    break
        progress.close()
        stopped = trainer.step_count < config.train.steps  # the deadline passed
        with doing("checkpoint"):
            final = _last_checkpoint(checkpointer, trainer, _extra(sampler, skipped, config, run), saved,
                                     (stopped or config.checkpoint.final) and diverged.in_a_row == 0)
        if stopped and rank == 0:
            print(f"mimo train: stopped after step {trainer.step_count} of {config.train.steps}, "
                  f"{deadline.why(config.train.exit_duration_in_mins)}; checkpoint {final}: --resume continues",
                  flush=True)
    enter("finish")
    if rank == 0 and skipped.summary():
        print(skipped.summary(), flush=True)
    if config.evaluates and not stopped and final is not None:
        last.update(_evaluate(plan, final, trainer.step_count, writer, rank))
    dist.barrier()
    writer.close()
    return last


def _last_checkpoint(checkpointer: Checkpointer, trainer: MimoTrainer, extra: dict[str, Any], saved: Path | None,
                     wanted: bool) -> Path | None:
    """The run's last checkpoint, if `wanted` (a stop before the last step always wants one, to resume from): the
    interval's if it has just written this step's, else a new save (a collective)."""
    if not wanted:
        return None
    if saved == checkpointer.path(trainer.step_count):
        return saved
    return checkpointer.save(trainer.step_count, trainer, extra)


def _loader(config: RunConfig, dataset, sampler: GlobalBatchSampler, device: torch.device,
            worker_init: Callable[[int], None] | None = None) -> BatchPrefetcher:
    """The run's loader: `data.num_workers` processes (unset: `default_num_workers` for this node's ranks), each
    starting with `worker_init`; pinned batches on a GPU."""
    workers = config.data.num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return BatchPrefetcher(dataset, sampler, pin_memory=device.type == "cuda", num_workers=workers,
                           prefetch_factor=config.data.prefetch_factor, worker_init=worker_init)


def _injected_fault(rank: int) -> int | None:
    """`MIMO_INJECT_FAULT=RANK:STEP` makes that rank raise at that step: how tests prove a failing rank
    ends the whole job promptly. Unset in normal runs."""
    spec = os.environ.get("MIMO_INJECT_FAULT")
    if not spec:
        return None
    fault_rank, step = (int(x) for x in spec.split(":"))
    return step if fault_rank == rank else None


def _write_run_dir(config: RunConfig, rank_map: str, quiet: bool) -> None:
    """The resolved config (saved and printed) and the rank map."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    (config.run_dir / "config.yaml").write_text(text)
    if not quiet:
        print(f"resolved config (saved to {config.run_dir / 'config.yaml'}):\n{text}{rank_map}", flush=True)


def check_resume_fits(plan: RunPlan, path: str | Path) -> None:
    """Before any worker starts: the parts the checkpoint leaves out come from this run's Hugging Face directories
    (`omitted_prefixes`), and its data position fits this run's batches (dataset size, global batch, seed), by
    the rule the workers apply (`GlobalBatchSampler.load_state_dict`); else a one-line CheckpointError naming
    what differs, instead of the workers' refusal after the whole start-up."""
    config = plan.config
    _, info = open_checkpoint(Path(path), verify=False)  # `newest_intact` has just verified it
    omitted_prefixes(Path(path), info, plan.hf_parts)
    dataset = plan.dataset(plan.whole_model_provider())
    sampler = GlobalBatchSampler(len(dataset), config.train.global_batch_size, config.train.seed)
    try:
        sampler.load_state_dict(info["extra"]["sampler"])
    except (KeyError, TypeError):
        raise CheckpointError(f"cannot resume from {path}: it records no data position") from None
    except ValueError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None


def _start_checkpoint(config: RunConfig, resume: bool, resume_from: str | None) -> tuple[Path | None, bool]:
    """The checkpoint the run's weights start from, and whether the run resumes it: with `resume`, `resume_from`
    or the run's newest complete checkpoint; else (or with none yet) `checkpoint.pretrained_checkpoint`'s, whose
    weights only are taken (None: the model as built)."""
    if resume:
        path = Path(resume_from) if resume_from else Checkpointer(config.checkpoint_dir).latest()
        if path is not None:
            return path, True
    pretrained = config.checkpoint.pretrained_checkpoint
    return (weights_path(pretrained) if pretrained else None), False


def _resume(checkpointer: Checkpointer, trainer: MimoTrainer, sampler: GlobalBatchSampler, skipped: SkippedSamples,
            rank: int, path: Path, verified: bool) -> None:
    """Continue from checkpoint `path`, whatever layout wrote it (its hashes checked here unless `verified`)."""
    extra = checkpointer.load(path, trainer, verify=not verified)
    sampler.load_state_dict(extra["sampler"])
    skipped.load_state_dict(extra.get("skipped"))
    if rank == 0:
        print(f"resumed from {path} at step {trainer.step_count}", flush=True)


def _report_cut(dropped: list[str]) -> None:
    """One line when resuming cut `metrics.jsonl` back to the resumed step."""
    if dropped:
        print(f"{METRICS_FILE}: dropped {', '.join(dropped)} (logged after the checkpoint resumed from)", flush=True)


def _extra(sampler: GlobalBatchSampler, skipped: SkippedSamples, config: RunConfig, run: dict | None) -> dict[str, Any]:
    """A checkpoint's run state besides the model: the data position, the skipped samples, the config, and the run
    that wrote it (`run_dir.run_identity`: a resume by another run is refused)."""
    return {"sampler": sampler.state_dict(), "skipped": skipped.state_dict(), "config": config.to_dict(), "run": run}


def _slowest_rank_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """Every phase's time on the slowest rank that ran it (each rank times only what it hosts)."""
    everyone: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, seconds)
    merged: dict[str, float] = {}
    for per_rank in everyone:
        for key, value in per_rank.items():
            merged[key] = max(merged.get(key, 0.0), value)
    return merged


def _evaluation_due(config: RunConfig, step: int) -> bool:
    """Whether the held-out evaluation is due at this checkpointed step (`eval.interval`)."""
    return config.evaluates and bool(config.eval.interval) and step % config.eval.interval == 0


def _evaluate(plan: RunPlan, checkpoint: Path, step: int, writer: MetricsWriter, rank: int) -> dict[str, float]:
    """The held-out evaluation of the checkpoint of `step`, the model loaded whole into rank 0's process (any
    layout): the mean per-token loss and, when the run answers (`eval.generate`), the scores of its greedy answers
    by `mimo eval`'s path, logged as one eval record and printed; the other ranks wait. Rank 0's values
    (`held_out_loss`, `exact_match`, `token_accuracy`), else {}."""
    scores: dict[str, float] = {}
    loss = None
    if rank == 0:
        config = plan.config
        provider = plan.whole_model_provider(torch.device("cpu"))
        model = provider.provide()
        load_model_only(checkpoint, model, plan.hf_parts, verify=False)  # this run has just written it
        source = config.eval.path or "the digits' held-out split"
        loss, count = held_out_loss(model, plan.dataset(provider, "held_out"), positions=provider.text_positions)
        print(f"held-out loss at step {step}: {loss:.4f} ({count} samples of {source})", flush=True)
        if config.answers_held_out:
            request = EvalRequest(Path(config.eval.path) if config.eval.path else None, data=config.data)
            held_out = plan.family.questions(config.model, plan.opened, provider, request, config.precision.param_dtype)
            answers = answer_questions(model, held_out, config.eval.max_new_tokens, config.eval.batch_size)
            scores = answers.scores()
            print(f"held-out answers at step {step}: {answers.summary(source)}", flush=True)
        writer.log_eval(step, {"loss": loss, **scores})
    dist.barrier()
    return {} if loss is None else {"held_out_loss": loss, **scores}
