"""When a run stops early and cleanly, at a step boundary: `train.exit_duration_in_mins` (its time is used) and
`train.exit_signal_handler` (SIGTERM received: a scheduler's preemption notice). Megatron's names.

A job scheduler's wall-time limit, or a preemption, kills a run mid-step; with either setting the run checkpoints
after the step in flight and exits, and `mimo train --resume` continues exactly where it stopped. Every rank must
stop after the same step (a checkpoint is a collective), so the ranks decide together: each rank's two votes (time
used, SIGTERM received) ride on the step's own world all-reduce (`MimoTrainer.train_step(votes=...)`), and a
sum above 0 stops every rank; no collective or host sync is added.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

_SIGTERM_NOTED = threading.Event()  # this process deferred a SIGTERM (`Deadline._receive`): `end_as_signalled`


class Deadline:
    """Whether the run must stop, as every rank sees it: its time is used, or a rank received SIGTERM (with
    `on_signal`); true on all ranks once true on any."""

    def __init__(self, minutes: float | None, start: float | None = None, on_signal: bool = False) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.on_signal = on_signal
        self.start = time.monotonic() if start is None else start  # the run's start: checks and loading count too
        self.signalled = self.timed_out = False  # as all ranks agreed, once `agreed` is true
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

        A process forked while it was installed ignores it, as the data loader's workers do (`ignore_sigterm`,
        since torch's worker puts a handler of its own in place of this one): a scheduler signals every process
        of the job, and the rank, not the signal, ends its children."""
        if os.getpid() == self._pid:
            self._received = True
            _SIGTERM_NOTED.set()

    @property
    def loader_worker_init(self) -> Callable[[int], None] | None:
        """What each data loader worker runs first (`BatchPrefetcher`'s `worker_init`): with the signal handler
        on, `ignore_sigterm`."""
        return ignore_sigterm if self.on_signal else None

    @property
    def enabled(self) -> bool:
        """Whether either setting is on (else the run never stops early, and nothing is exchanged)."""
        return self.seconds is not None or self.on_signal

    def votes(self) -> tuple[float, ...]:
        """This rank's (time used, SIGTERM received), as 0/1, for the ranks to sum (`MimoTrainer.train_step`);
        none when neither setting is on (nothing to exchange)."""
        if not self.enabled:
            return ()
        late = self.seconds is not None and self.elapsed() >= self.seconds
        return float(late), float(self._received)

    def agreed(self, summed: tuple[float, ...]) -> bool:
        """Whether to stop, from every rank's `votes` summed: true on all ranks once true on any."""
        if not self.enabled:
            return False
        self.timed_out, self.signalled = summed[0] > 0, summed[1] > 0
        return self.timed_out or self.signalled

    def elapsed(self) -> float:
        """Seconds since the run started on this rank."""
        return time.monotonic() - self.start

    def why(self, minutes: float | None) -> str:
        """Why the run stopped, for its last line (after `agreed` was true)."""
        if self.signalled:
            return "a rank received SIGTERM (train.exit_signal_handler)"
        return f"{self.elapsed() / 60:.1f} min into the run (train.exit_duration_in_mins: {minutes:g})"


def ignore_sigterm(worker_id: int) -> None:
    """A data loader worker under `train.exit_signal_handler` ignores SIGTERM. torch's worker handler dies of any
    SIGTERM its rank did not send, and its rank's loader then fails the step in flight; a scheduler signals every
    process of the job. The rank still ends it when closing the loader, and torch's worker loop ends by itself
    once the rank is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_as_signalled() -> None:
    """A rank that deferred a SIGTERM (and has stopped cleanly for it, its checkpoint written) dies of it now, as a
    process that defers a signal should. Returning instead, a worker of torch's elastic agent waits for the agent to
    collect its result, which an agent shutting down on that same SIGTERM never does: it waits out its 30 s grace and
    SIGKILLs. The launcher reads a death by SIGTERM as the job stopped by it (exit 143)."""
    if not _SIGTERM_NOTED.is_set():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
