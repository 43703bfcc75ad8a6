"""Pipeline schedule orders: which (kind, micro-batch, chunk) a pipeline rank runs next, as pure functions.

A rank of a pipeline of `stages` ranks holds `chunks` model chunks (virtual pipeline parallelism; 1 for plain
1F1B): chunk c of rank r is virtual stage c·stages + r, so a micro-batch visits every rank once per chunk.
`one_f_one_b` is the standard order (warm-up forwards, one forward one backward, cool-down backwards);
`interleaved_one_f_one_b` is Megatron-LM's interleaved order (its `get_schedule_table`: micro-batches in groups
of `stages`, forwards through the chunks in order, backwards in reverse), which cuts the bubble by `chunks`.
`forward_only` is a stage with nothing to train (a frozen encoder's): no backward at all.
`PipelineSchedule` runs these orders; benchmarks/pipeline_bubble.py replays them with measured times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]


@dataclass(frozen=True)
class Op:
    """One unit of a rank's pipeline work: the forward or backward of micro-batch `m` through chunk `chunk`."""

    kind: Kind
    m: int
    chunk: int = 0


def one_f_one_b(stage: int, stages: int, microbatches: int) -> list[Op]:
    """Rank `stage`'s 1F1B order: `stages - stage - 1` warm-up forwards, then alternate, then the backwards left."""
    warmup = min(stages - stage - 1, microbatches)
    ops = [Op("F", i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        ops += [Op("F", warmup + i), Op("B", i)]
    return ops + [Op("B", i) for i in range(microbatches - warmup, microbatches)]


def check_interleaving(stages: int, chunks: int, microbatches: int) -> None:
    """Megatron's rule for the interleaved order: the micro-batches come in whole groups of `stages`."""
    if chunks > 1 and microbatches % stages:
        raise ValueError(f"virtual_pipeline_model_parallel_size={chunks} needs num_microbatches divisible by "
                         f"pipeline_model_parallel_size={stages}, got {microbatches}; use a multiple of {stages}")


def _virtual(k: int, stages: int, chunks: int, backward: bool) -> Op:
    """The k-th forward (or backward) of a rank in the interleaved order: groups of `stages` micro-batches go
    through chunk 0, 1, ... (backwards: the last chunk first)."""
    group, within = divmod(k, stages * chunks)
    chunk = within // stages
    return Op("B" if backward else "F", group * stages + within % stages,
              chunks - 1 - chunk if backward else chunk)


def interleaved_one_f_one_b(stage: int, stages: int, chunks: int, microbatches: int) -> list[Op]:
    """Rank `stage`'s interleaved 1F1B order over `chunks` model chunks (plain 1F1B when `chunks` is 1)."""
    if chunks == 1:
        return one_f_one_b(stage, stages, microbatches)
    check_interleaving(stages, chunks, microbatches)
    total = microbatches * chunks
    warmup = min((stages - stage - 1) * 2 + (chunks - 1) * stages, total)
    ops = [_virtual(k, stages, chunks, backward=False) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [_virtual(warmup + i, stages, chunks, backward=False), _virtual(i, stages, chunks, backward=True)]
    return ops + [_virtual(k, stages, chunks, backward=True) for k in range(total - warmup, total)]


def forward_only(microbatches: int, chunks: int = 1) -> list[Op]:
    """A stage with no trainable parameters and no trainable stage before it: forwards only, in order."""
    return [Op("F", m, c) for m in range(microbatches) for c in range(chunks)]


@dataclass(frozen=True)
class Timeline:
    """What `simulate` found: when the step ends, and each rank's busy time."""

    makespan: float
    busy: dict[int, float]

    @property
    def bubble(self) -> float:
        """The share of the ranks' time spent waiting: 1 - busy / (ranks · makespan)."""
        return 1.0 - sum(self.busy.values()) / (len(self.busy) * self.makespan)


def simulate(orders: dict[int, list[Op]], stage_of: dict[tuple[int, int], int],
             duration: dict[tuple[str, int], float], latency: float = 0.0) -> Timeline:
    """Replay each rank's order with `duration[(kind, stage)]` per op: an op starts when its rank is free and its
    input exists (the forward of the stage before, the backward of the stage after, when that stage has one),
    `latency` after it was sent. `stage_of[(rank, chunk)]` numbers the pipeline's stages in data order. Raises
    if the orders deadlock (each rank waits for another)."""
    owner = {stage: rank for (rank, _), stage in stage_of.items()}
    has_backward = {stage_of[(r, op.chunk)] for r, ops in orders.items() for op in ops if op.kind == "B"}
    done: dict[tuple[str, int, int], float] = {}
    clock = {rank: 0.0 for rank in orders}
    busy = {rank: 0.0 for rank in orders}
    position = {rank: 0 for rank in orders}
    while any(position[r] < len(orders[r]) for r in orders):
        progressed = False
        for rank, ops in orders.items():
            while position[rank] < len(ops):
                op = ops[position[rank]]
                stage = stage_of[(rank, op.chunk)]
                ready = _ready(op, stage, owner, has_backward, done, latency)
                if ready is None:
                    break
                start = max(clock[rank], ready)
                clock[rank] = start + duration[(op.kind, stage)]
                busy[rank] += duration[(op.kind, stage)]
                done[(op.kind, op.m, stage)] = clock[rank]
                position[rank] += 1
                progressed = True
        if not progressed:
            waiting = {r: orders[r][position[r]] for r in orders if position[r] < len(orders[r])}
            raise RuntimeError(f"the pipeline orders deadlock: ranks wait at {waiting}")
    return Timeline(max(clock.values()), busy)


def _ready(op: Op, stage: int, owner: dict[int, int], has_backward: set[int],
           done: dict[tuple[str, int, int], float], latency: float) -> float | None:
    """When `op`'s inputs are on its rank (None: not yet computed)."""
    needs = []
    if op.kind == "F" and stage - 1 in owner:
        needs.append(("F", op.m, stage - 1))
    if op.kind == "B":
        needs.append(("F", op.m, stage))
        if stage + 1 in has_backward:
            needs.append(("B", op.m, stage + 1))
    if any(need not in done for need in needs):
        return None
    return max((done[n] + (latency if n[2] != stage else 0.0) for n in needs), default=0.0)
