"""A 1F1B pipeline schedule (plain or interleaved) for the language model, with hooks for what MIMO needs on stage 0.

`torch.distributed.pipelining` splits a whole batch given up front and does not hand stage 0's input
gradients back; here stage 0's input arrives per micro-batch from the bridge (an encoder may still be
computing the next one) and its gradient goes back across the bridge. So the schedule is ours: the
standard one-forward-one-backward order (or Megatron's interleaved one over several model chunks per rank),
activations and gradients moved point to point over the
module's pipeline group (asynchronous sends, blocking receives), the step supplying the stage's work.
An activation is one tensor or several (the hidden states and DeepStack's features for later stages): several
travel as one flat buffer, one message each way, and the receiver views it as the parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimo.grid import P2PGroups, is_first_pp_stage, is_last_pp_stage
from mimo.training.schedules import interleaved_one_f_one_b

_TAG_BASE = 1 << 20  # p2p tags of the pipeline, clear of the bridge's

Activation = torch.Tensor | tuple[torch.Tensor, ...]  # what a stage sends the next: one tensor, or several
Shape = tuple[int, ...]


@dataclass
class StageWork:
    """What a stage does for micro-batch m on model chunk c (0 without virtual stages); supplied by the step.

    forward(m, c, x): run chunk c of the stage on `x` (None on the first virtual stage; a tuple where the previous
    stage sends several tensors) and return its output activation (a tensor or a tuple), or on the last virtual
    stage the scalar to backpropagate. before_backward(m, c, out, last): called just before the backward of m
    through chunk c with its output; `last` says it is the chunk's last backward of the step (gradient-sync
    decisions). after_backward(m, c): called after it (virtual stage 0: the bridge).
    """

    forward: Callable[[int, int, Activation | None], Activation]
    before_backward: Callable[[int, int, Activation, bool], None] = lambda m, c, out, last: None
    after_backward: Callable[[int, int], None] = lambda m, c: None


@dataclass
class PipelineSchedule:
    """One-forward-one-backward over `num_microbatches` on this rank's stage of `pp_group` (None: PP 1); with
    `chunks` > 1 model chunks per rank, Megatron's interleaved order: chunk c of rank r is virtual stage
    c·PP + r, so rank PP-1's chunk c sends to rank 0's chunk c+1."""

    pp_group: dist.ProcessGroup | None
    num_microbatches: int
    # per micro-batch, what this stage receives: one shape, or one per tensor (a packed row's length varies);
    # with several chunks, one such list per chunk
    activation_shapes: Sequence[Shape | tuple[Shape, ...]] | Sequence[Sequence[Shape | tuple[Shape, ...]]]
    dtype: torch.dtype
    device: torch.device | str = "cpu"
    p2p_groups: P2PGroups | None = None  # activations and gradients on separate groups (NCCL streams)
    chunks: int = 1  # model chunks per rank (virtual_pipeline_model_parallel_size)
    _sends: list[dist.Work] = field(default_factory=list, repr=False)

    @property
    def stage(self) -> int:
        """This rank's stage index."""
        return 0 if self.pp_group is None else dist.get_rank(self.pp_group)

    @property
    def num_stages(self) -> int:
        """Pipeline depth (ranks)."""
        return 1 if self.pp_group is None else dist.get_world_size(self.pp_group)

    @property
    def is_first(self) -> bool:
        """Whether this rank holds virtual stage 0 (its chunk 0)."""
        return is_first_pp_stage(self.stage)

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the last virtual stage (its last chunk)."""
        return is_last_pp_stage(self.stage, self.num_stages)

    def first(self, chunk: int) -> bool:
        """Whether chunk `chunk` of this rank is the first virtual stage."""
        return self.is_first and chunk == 0

    def last(self, chunk: int) -> bool:
        """Whether chunk `chunk` of this rank is the last virtual stage."""
        return self.is_last and chunk == self.chunks - 1

    def order(self) -> list[tuple[str, int, int]]:
        """This rank's ('F' | 'B', micro-batch, chunk) sequence: warm-up forwards, 1F1B steady state, cool-down
        (`schedules.interleaved_one_f_one_b`, plain 1F1B with one chunk)."""
        return [(op.kind, op.m, op.chunk) for op in
                interleaved_one_f_one_b(self.stage, self.num_stages, self.chunks, self.num_microbatches)]

    def run(self, work: StageWork) -> None:
        """Run every micro-batch's forward and backward through every chunk of this rank, in the schedule's order."""
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, Activation]] = {}
        for kind, m, c in self.order():
            if kind == "F":
                saved[m, c] = self._forward(work, m, c)
            else:
                self._backward(work, m, c, *saved.pop((m, c)))
        for w in self._sends:
            w.wait()
        self._sends.clear()

    def _forward(self, work: StageWork, m: int, c: int) -> tuple[torch.Tensor | None, Activation]:
        """Receive m's input (a leaf: its gradient goes back), run chunk c, send its output on."""
        x, parts = None, None
        if not self.first(c):
            shapes = _shapes(self._shapes_of(c)[m])
            x = self._recv(-1, self._tag(m, self._lower_chunk(c), 0),
                           (sum(_numel(s) for s in shapes),)).requires_grad_()
            parts = _views(x, shapes)
        out = work.forward(m, c, parts[0] if parts is not None and len(parts) == 1 else parts)
        if not self.last(c):  # activations travel in the schedule's dtype, whatever autocast produced
            self._send(_flat(_parts(out), self.dtype), +1, self._tag(m, c, 0))
        return x, out

    def _backward(self, work: StageWork, m: int, c: int, x: torch.Tensor | None, out: Activation) -> None:
        """Backpropagate m through chunk c from its output's gradient (received, unless last) and send its input's
        back."""
        work.before_backward(m, c, out, m == self.num_microbatches - 1)
        outs = _parts(out)
        if self.last(c):
            grads = [None] * len(outs)
        else:
            grad = self._recv(+1, self._tag(m, c, 1), (sum(o.numel() for o in outs),))
            grads = [g.to(o.dtype) for g, o in zip(_views(grad, [o.shape for o in outs]), outs, strict=True)]
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]  # a frozen tower's rows: none
        if pairs:  # none: nothing before this point trains (a frozen model behind frozen encoders)
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs] if not self.last(c) else None)
        if x is not None:
            self._send(x.grad if x.grad is not None else torch.zeros_like(x), -1,
                       self._tag(m, self._lower_chunk(c), 1))
        work.after_backward(m, c)

    def _shapes_of(self, chunk: int) -> Sequence[Shape | tuple[Shape, ...]]:
        """Per micro-batch, what chunk `chunk` receives."""
        return self.activation_shapes[chunk] if self.chunks > 1 else self.activation_shapes

    def _lower_chunk(self, chunk: int) -> int:
        """The chunk (on its own rank) of the virtual stage before chunk `chunk` of this rank."""
        return chunk - 1 if self.is_first else chunk

    def _peer(self, step: int) -> int:
        """The global rank of the stage `step` away (around the ring: virtual stages wrap to the next chunk)."""
        return dist.get_global_rank(self.pp_group, (self.stage + step) % self.num_stages)

    def _tag(self, m: int, lower_chunk: int, direction: int) -> int:
        """The tag of m's message across the boundary after `lower_chunk` of the sending (forward) or receiving
        (backward) rank: distinct per (micro-batch, chunk, direction); even forward, odd backward."""
        return _TAG_BASE + 2 * (m * self.chunks + lower_chunk) + direction

    def _crosses_seam(self, step: int) -> bool:
        """Whether the message to or from the stage `step` away crosses the interleaved ring's seam (rank PP-1's
        chunk c → rank 0's chunk c+1, or its gradient back)."""
        return self.chunks > 1 and (self.is_last if step > 0 else self.is_first)

    def _send(self, tensor: torch.Tensor, step: int, tag: int) -> None:
        """Post `tensor` to the stage `step` away (asynchronous; completed at the end of `run`); across the
        interleaved ring's seam on the seam's groups: at PP 2 the seam joins the same two ranks as stage 0 → 1, the
        other way, and NCCL serializes one (pair, group)'s messages in posting order (`P2PGroups`)."""
        self._sends.append(P2PGroups.isend(self.p2p_groups, tensor, self._peer(step), tag, self._crosses_seam(step)))

    def _recv(self, step: int, tag: int, shape: Shape) -> torch.Tensor:
        """Receive a tensor of `shape` from the stage `step` away (blocking)."""
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        return P2PGroups.recv(self.p2p_groups, buffer, self._peer(step), tag, self._crosses_seam(step))


def _shapes(shapes: Shape | tuple[Shape, ...]) -> tuple[Shape, ...]:
    """One shape or several, as several."""
    return (shapes,) if not shapes or isinstance(shapes[0], int) else shapes


def _numel(shape: Shape) -> int:
    """Elements of a tensor of this shape."""
    return int(torch.Size(shape).numel())


def _parts(out: Activation) -> tuple[torch.Tensor, ...]:
    """An activation as its tensors."""
    return out if isinstance(out, tuple) else (out,)


def _flat(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors, detached, in `dtype`, as one 1-D buffer (one tensor: no copy beyond the cast)."""
    if len(parts) == 1:
        return parts[0].detach().to(dtype).flatten()
    return torch.cat([p.detach().to(dtype).flatten() for p in parts])


def _views(flat: torch.Tensor, shapes: Sequence[Shape]) -> tuple[torch.Tensor, ...]:
    """A 1-D buffer viewed as consecutive tensors of these shapes."""
    return tuple(piece.view(shape) for piece, shape in
                 zip(flat.split([_numel(s) for s in shapes]), shapes, strict=True))
