"""What this rank is doing now, and since when: the phase its heartbeat carries to the launcher's hang watch.

A heartbeat proves the process lives, not that it moves: a read from a stalled network file system blocks the
training thread while the heartbeat thread beats on. So the loop marks what it waits on (`"step"` while it
trains: compute and collectives; `doing("data")` around the next batch, `"checkpoint"` around a save) and the
launcher names and ends a rank that stays in a bounded phase past its bound (`phase_bounds`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

# what a rank in each phase waits on, as the launcher's report says it
WAITS_ON = {
    "start": "start-up (building the model, loading weights)",
    "data": "the next batch from the data loader (a read that never returns: a stalled file system?)",
    "step": "its training step (compute and collectives with the other ranks)",
    "checkpoint": "a checkpoint write",
    "finish": "the end of the run (evaluation, the last collectives)",
}
_now: tuple[str, float] = ("start", time.time())


def current() -> tuple[str, float]:
    """(this process's phase, the wall-clock time it entered it)."""
    return _now


def enter(phase: str) -> None:
    """Mark this process as in `phase` (one of `WAITS_ON`) from now on."""
    global _now
    _now = (phase, time.time())


@contextlib.contextmanager
def doing(phase: str) -> Iterator[None]:
    """Mark this process as in `phase` for the block, then back in the phase it was in (its clock restarted)."""
    before = _now[0]
    enter(phase)
    try:
        yield
    finally:
        enter(before)


def phase_bounds(config: Any) -> dict[str, float]:
    """The longest a rank may stay in each bounded phase, from the run config: a batch may take
    `data.timeout_s`. (Collectives are bounded by `train.timeout_s` inside torch; the step and a checkpoint
    write are not bounded here: a first compiled step or a large save may take long.)"""
    return {"data": float(config.data.timeout_s)}
