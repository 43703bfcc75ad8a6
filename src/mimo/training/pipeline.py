"""A 1F1B pipeline schedule for the language model, with hooks for what MIMO needs on stage 0.

`torch.distributed.pipelining` splits a whole batch given up front and does not hand stage 0's input
gradients back; here stage 0's input arrives per micro-batch from the bridge (an encoder may still be
computing the next one) and its gradient goes back across the bridge. So the schedule is ours: the
standard one-forward-one-backward order, activations and gradients moved point to point over the
module's pipeline group (asynchronous sends, blocking receives), the step supplying the stage's work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimo.grid import P2PGroups, is_first_pp_stage, is_last_pp_stage
from mimo.training.schedules import one_f_one_b

_TAG_BASE = 1 << 20  # p2p tags of the pipeline, clear of the bridge's


@dataclass
class StageWork:
    """What a stage does for micro-batch m; supplied by the training step.

    forward(m, x): run the stage on `x` (None on the first stage) and return its output activation, or on
    the last stage the scalar to backpropagate. before_backward(m, out, last): called just before the
    backward of m with the stage's output (gradient-sync decisions). after_backward(m): called after it
    (stage 0: the bridge).
    """

    forward: Callable[[int, torch.Tensor | None], torch.Tensor]
    before_backward: Callable[[int, torch.Tensor, bool], None] = lambda m, out, last: None
    after_backward: Callable[[int], None] = lambda m: None


@dataclass
class PipelineSchedule:
    """One-forward-one-backward over `num_microbatches` on this rank's stage of `pp_group` (None: PP 1)."""

    pp_group: dist.ProcessGroup | None
    num_microbatches: int
    activation_shapes: Sequence[tuple[int, ...]]  # per micro-batch (a packed row's length varies)
    dtype: torch.dtype
    device: torch.device | str = "cpu"
    p2p_groups: P2PGroups | None = None  # activations and gradients on separate groups (NCCL streams)
    _sends: list[dist.Work] = field(default_factory=list, repr=False)

    @property
    def stage(self) -> int:
        """This rank's stage index."""
        return 0 if self.pp_group is None else dist.get_rank(self.pp_group)

    @property
    def num_stages(self) -> int:
        """Pipeline depth."""
        return 1 if self.pp_group is None else dist.get_world_size(self.pp_group)

    @property
    def is_first(self) -> bool:
        return is_first_pp_stage(self.stage)

    @property
    def is_last(self) -> bool:
        return is_last_pp_stage(self.stage, self.num_stages)

    def order(self) -> list[tuple[str, int]]:
        """This stage's ('F' | 'B', micro-batch) sequence: warm-up forwards, 1F1B steady state, cool-down
        (`schedules.one_f_one_b`)."""
        return [(op.kind, op.m) for op in one_f_one_b(self.stage, self.num_stages, self.num_microbatches)]

    def run(self, work: StageWork) -> None:
        """Run every micro-batch's forward and backward on this stage in 1F1B order."""
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        for kind, m in self.order():
            if kind == "F":
                saved[m] = self._forward(work, m)
            else:
                self._backward(work, m, *saved.pop(m))
        for w in self._sends:
            w.wait()
        self._sends.clear()

    def _forward(self, work: StageWork, m: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = None
        if not self.is_first:
            x = self._recv(self._peer(-1), self._tag(m, 0), self.activation_shapes[m]).requires_grad_()
        out = work.forward(m, x)
        if not self.is_last:  # activations travel in the schedule's dtype, whatever autocast produced
            self._send(out.detach().to(self.dtype), self._peer(+1), self._tag(m, 0))
        return x, out

    def _backward(self, work: StageWork, m: int, x: torch.Tensor | None, out: torch.Tensor) -> None:
        work.before_backward(m, out, m == self.num_microbatches - 1)
        shape = self.activation_shapes[m]
        grad = None if self.is_last else self._recv(self._peer(+1), self._tag(m, 1), shape).to(out.dtype)
        torch.autograd.backward(out, grad)
        if x is not None:
            self._send(x.grad, self._peer(-1), self._tag(m, 1))
        work.after_backward(m)

    def _peer(self, step: int) -> int:
        """The global rank of the stage `step` away."""
        return dist.get_global_rank(self.pp_group, self.stage + step)

    def _tag(self, m: int, direction: int) -> int:
        return _TAG_BASE + 2 * m + direction

    def _group(self, tag: int) -> dist.ProcessGroup | None:
        """The world-wide group of the message's direction (tags: even forward, odd backward)."""
        return P2PGroups.pick(self.p2p_groups, backward=tag % 2 == 1)

    def _send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self._sends.append(dist.isend(tensor.contiguous(), peer, group=self._group(tag), tag=tag))

    def _recv(self, peer: int, tag: int, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, peer, group=self._group(tag), tag=tag)
        return buffer
