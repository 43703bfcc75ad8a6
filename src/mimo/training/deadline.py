"""`train.exit_duration_in_mins`: stop a run cleanly at a step boundary once its time is used (Megatron's name).

A job scheduler's wall-time limit, or a time-sliced GPU allocation, kills a run mid-step; with a deadline the run
checkpoints after the step that passed it and exits, and `mimo train --resume` continues exactly where it
stopped. Every rank must stop after the same step (a checkpoint is a collective), so the ranks decide together:
one all-reduce (MAX) of a flag per step, only when a deadline is set.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Deadline:
    """Whether the run's time is used, as every rank's clock sees it: true on all ranks once true on any."""

    def __init__(self, minutes: float | None, device: torch.device, start: float | None = None) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.device = device
        self.start = time.monotonic() if start is None else start  # the workers' start: loading counts too

    def passed(self) -> bool:
        """Collective when a deadline is set (every rank calls it after every step); False without one."""
        if self.seconds is None:
            return False
        flag = torch.tensor([float(self.elapsed() >= self.seconds)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def elapsed(self) -> float:
        """Seconds since the run started on this rank."""
        return time.monotonic() - self.start
