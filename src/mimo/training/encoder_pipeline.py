"""An encoder's pipeline stages (`pipeline_model_parallel_size` on a modality module, issue 29).

Stage 0 holds the tower's front (patch embedding, stem) and its first blocks, the last stage its last blocks and the
projection; the last stage's rows cross the bridge. The schedule is the encoder phases' own (`step.py`): in phase 1
each stage runs the forwards of the step's micro-batches in order, receiving each input from the stage before and
sending its output on at once; in phase 3 each runs the backwards in the same order as the gradients arrive, the last
stage from the bridge, every other from the stage after. It is the simplest exact order: on a heterogeneous edge the
language pipeline needs micro-batch m's rows before it can give m's gradient back, so no order could start a backward
earlier than the gradients allow, and keeping the phases means the step, the bridge and DDP's one arming per backward
need nothing new (memory: every micro-batch's activations live until phase 3, as on an unpipelined encoder).

A stage runs a backward only if it or a stage before it trains (`StageTraining`): a frozen tower's stages before the
last run forward under `torch.no_grad` (no activations kept) and no gradient crosses between them, while a trainable
projection on the last stage still learns. Activations travel point to point over the world's forward group and
gradients over the backward one (`P2PGroups`), in micro-batch order on both ends, so NCCL matches them in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimo.grid import ModuleGrid, P2PGroups

_TAG_BASE = 1 << 24  # clear of the bridge's (edge bits above 15) and the language pipeline's (1 << 20 on)
_MICROBATCH_BITS = 13


@dataclass(frozen=True)
class StageTraining:
    """Which stages of one encoder pipeline have trainable parameters (`trains[s]`), as every stage knows it."""

    trains: tuple[bool, ...]

    def runs_backward(self, stage: int) -> bool:
        """Stage `stage` backpropagates: it or a stage before it trains (else it runs under `torch.no_grad`)."""
        return any(self.trains[:stage + 1])

    def input_needs_grad(self, stage: int) -> bool:
        """Stage `stage`'s input gradient goes back to the stage before: some stage before it trains."""
        return any(self.trains[:stage])

    @classmethod
    def gather(cls, trains: bool, group: dist.ProcessGroup, device: torch.device) -> StageTraining:
        """Every stage's flag, from one all-gather over the pipeline group (once, when the trainer is built)."""
        flags = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(flags, torch.tensor([int(trains)], dtype=torch.int32, device=device), group=group)
        return cls(tuple(bool(f.item()) for f in flags))


@dataclass
class EncoderStages:
    """This rank's stage of one encoder's pipeline: receives, runs and sends each micro-batch's forward, and
    its backward (`forward`, `backward`, `return_input_grad`)."""

    grid: ModuleGrid
    index: int  # the module's place in the layout: tags of two encoders' pipelines on the same ranks differ
    training: StageTraining
    dtype: torch.dtype
    device: torch.device
    p2p_groups: P2PGroups | None = None
    _saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict, repr=False)
    _sends: list[dist.Work] = field(default_factory=list, repr=False)

    @property
    def stage(self) -> int:
        """This rank's stage."""
        return self.grid.coord.pp

    @property
    def is_first(self) -> bool:
        """Whether this rank holds the tower's front (takes the items)."""
        return self.grid.is_first_stage()

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the projection (hands its rows to the bridge)."""
        return self.grid.is_last_stage()

    @property
    def runs_backward(self) -> bool:
        """Whether this stage backpropagates at all."""
        return self.training.runs_backward(self.stage)

    def forward(self, m: int, shape: tuple[int, ...], run: Callable[[torch.Tensor | None], torch.Tensor]
                ) -> torch.Tensor | None:
        """Micro-batch m through this stage: `run` takes the input received from the stage before (None on stage
        0; of `shape`, which the receiver knows from the items' count or grids: `ModalitySubmodule.stage_input_shape`)
        and returns the stage's output, which goes on to the next stage (None returned) or, on the last, is
        returned for the bridge."""
        x = None
        if not self.is_first:
            x = self._recv(self._peer(-1), self._tag(m, 0), shape)
            if self.training.input_needs_grad(self.stage):
                x.requires_grad_()
        with contextlib.nullcontext() if self.runs_backward else torch.no_grad():
            out = run(x)
        if self.runs_backward:
            self._saved[m] = (x, out)
        if self.is_last:
            return out
        self._send(out.detach().to(self.dtype), self._peer(+1), self._tag(m, 0))
        return None

    def backward(self, m: int) -> None:
        """A stage before the last: receive m's output gradient from the stage after, backpropagate, send the
        input's gradient back (`return_input_grad`). Nothing where this stage does not backpropagate."""
        if not self.runs_backward:
            return
        _, out = self._saved[m]
        grad = self._recv(self._peer(+1), self._tag(m, 1), tuple(out.shape))
        torch.autograd.backward(out, grad.to(out.dtype))
        self.return_input_grad(m)

    def return_input_grad(self, m: int) -> None:
        """After m's backward through this stage (the last: through the bridge), send its input's gradient to the
        stage before, where one trains; release what m kept."""
        x, _ = self._saved.pop(m, (None, None))
        if x is not None and x.requires_grad:
            self._send(x.grad if x.grad is not None else torch.zeros_like(x), self._peer(-1), self._tag(m, 1))

    def wait(self) -> None:
        """Complete every send still in flight (the end of a step)."""
        for work in self._sends:
            work.wait()
        self._sends.clear()

    def _peer(self, step: int) -> int:
        """The global rank of the stage `step` away in this rank's pipeline."""
        coord = self.grid.coord
        return int(self.grid.ranks[coord.pp + step, coord.dp, coord.cp, coord.tp])

    def _tag(self, m: int, direction: int) -> int:
        """A tag per (encoder, micro-batch, direction): even forward, odd backward."""
        return _TAG_BASE + (((self.index << _MICROBATCH_BITS) | m % 2**_MICROBATCH_BITS) << 1) + direction

    def _send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self._sends.append(P2PGroups.isend(self.p2p_groups, tensor, peer, tag))

    def _recv(self, peer: int, tag: int, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        return P2PGroups.recv(self.p2p_groups, buffer, peer, tag)
