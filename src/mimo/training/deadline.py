"""When a run stops early and cleanly, at a step boundary: `train.exit_duration_in_mins` (its time is used) and
`train.exit_signal_handler` (SIGTERM received: a scheduler's preemption notice). Megatron's names.

A job scheduler's wall-time limit, or a preemption, kills a run mid-step; with either setting the run checkpoints
after the step in flight and exits, and `mimo train --resume` continues exactly where it stopped. Every rank must
stop after the same step (a checkpoint is a collective), so the ranks decide together: one all-reduce (MAX) of
two flags per step, only when either setting is on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist


class Deadline:
    """Whether the run must stop, as every rank sees it: its time is used, or a rank received SIGTERM (with
    `on_signal`); true on all ranks once true on any."""

    def __init__(self, minutes: float | None, device: torch.device, start: float | None = None,
                 on_signal: bool = False) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.device, self.on_signal = device, on_signal
        self.start = time.monotonic() if start is None else start  # the workers' start: loading counts too
        self.signalled = self.timed_out = False  # as all ranks agreed, once `passed` is true
        self._received = False
        self._pid = os.getpid()

    @contextlib.contextmanager
    def watching(self) -> Iterator[Deadline]:
        """While inside, SIGTERM (with `on_signal`) is noted instead of ending the process; the handler before is
        put back after."""
        if not self.on_signal:
            yield self
            return
        before = signal.signal(signal.SIGTERM, self._receive)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, before)

    def _receive(self, signum: int, frame: object) -> None:
        """SIGTERM: stop after the step in flight (the handler only notes it; the loop decides at the step's end).
        A process forked while it was installed (a data loader worker) ends as it would have without it."""
        if os.getpid() != self._pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._received = True

    def passed(self) -> bool:
        """Collective when either setting is on (every rank calls it after every step); False without them."""
        if self.seconds is None and not self.on_signal:
            return False
        late = self.seconds is not None and self.elapsed() >= self.seconds
        flags = torch.tensor([float(late), float(self._received)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.timed_out, self.signalled = (bool(f) for f in flags.tolist())
        return self.timed_out or self.signalled

    def elapsed(self) -> float:
        """Seconds since the run started on this rank."""
        return time.monotonic() - self.start

    def why(self, minutes: float | None) -> str:
        """Why the run stopped, for its last line (after `passed` was true)."""
        if self.signalled:
            return "a rank received SIGTERM (train.exit_signal_handler)"
        return f"{self.elapsed() / 60:.1f} min into the run (train.exit_duration_in_mins: {minutes:g})"
