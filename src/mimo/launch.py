"""`mimo train` without torchrun: start the workers with PyTorch's elastic launcher, used as a library.

One node, `nproc` workers, no restarts. When a worker raises, the agent stops the others within its
monitor interval and we report which rank failed first and why; Ctrl-C stops everything.

Which rank failed first is decided by time, not by which exit the agent happened to notice first: a
rank that raises makes its peers' collectives fail a moment later, and those peers may exit sooner.
Each worker writes `{rank, time, error}` to a shared directory as it raises, before its sockets close.

A rank that hangs without failing (stopped, deadlocked in native code) would hold the others in a collective
until its timeout (`train.timeout_s`, 300 s by default) and then be blamed on them. So each worker touches a
heartbeat file every second from a thread of its own, and the launcher names and kills a rank whose heartbeat
is older than `HANG_S`, whatever the collective timeout. A heartbeat proves only that the process lives: a read
from a stalled file system blocks the training thread while the heartbeat thread beats on. So the heartbeat
carries what the rank is doing and since when (`training.phase`), and the launcher names and kills a rank that
stays in a bounded phase past its bound (waiting for a batch: `data.timeout_s`).

Workers are forked from the launcher with torch and the training modules already imported (`start_method`): a
spawned worker spent 5-7 s of CPU importing them again, before any work. Fork needs a parent that has not
touched CUDA (the launcher never does; if something did, workers are spawned), and each forked worker puts
back the signal handlers a fresh interpreter has (the agent's own would turn SIGTERM into an exception).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.distributed import DistNetworkError
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mimo.fork_safe import nvml_check
from mimo.training.phase import WAITS_ON, current, enter, phase_bounds

HEARTBEAT_S = 1.0  # how often each worker touches its heartbeat file
HANG_S = 60.0  # default of MIMO_HANG_S: a heartbeat older than this means the rank is hung (tests lower it)


def launch(plan: Any, nproc: int, **kwargs: Any) -> int:
    """Run `_worker(plan, **kwargs)` on `nproc` local processes (`plan`: the checked `RunPlan`, handed over, not
    rebuilt); 0, or 1 with the failed ranks named (torch elastic's own log, whole tracebacks included, kept in
    the run directory: `agent_log`)."""
    import mimo.training.loop  # noqa: F401 - imported once here, inherited by every forked worker
    log = Path(plan.config.run_dir) / AGENT_LOG
    with tempfile.TemporaryDirectory(prefix="mimo-failures-") as failure_dir, \
            HangWatch(Path(failure_dir), bounds=phase_bounds(plan.config)), agent_log(log):
        try:
            _launch_on_a_free_port(nproc, plan, kwargs, failure_dir)
        except ChildFailedError as e:
            records = _read_failures(Path(failure_dir))
            if records or not _all_signalled(e, signal.SIGTERM):
                for line in _failure_report(e, records, _last_phases(Path(failure_dir))):
                    print(line, file=sys.stderr)
                _log_tracebacks(log, records)
                print(f"mimo train: each failed rank's whole traceback: {log}", file=sys.stderr)
                return 1
            return _stopped_by(signal.SIGTERM)  # the ranks alone were signalled, and stopped (`end_as_signalled`)
        except (KeyboardInterrupt, SignalException) as e:
            return _stopped_by(signal.Signals(getattr(e, "sigval", signal.SIGINT)))
    return 0


def _stopped_by(sig: signal.Signals) -> int:
    """Say that the job was stopped by `sig`; the shell's exit code for it (130 for SIGINT, 143 for SIGTERM)."""
    print(f"mimo train: stopped by {sig.name}; workers ended, and only complete checkpoints are ever loaded",
          file=sys.stderr)
    return 128 + sig.value


def _all_signalled(error: ChildFailedError, sig: signal.Signals) -> bool:
    """Whether every failed worker died of `sig` (raising nothing)."""
    return all(f.exitcode == -sig.value for f in error.failures.values())


AGENT_LOG = "launcher.log"  # torch elastic's log of a run, in its log.dir


@contextlib.contextmanager
def agent_log(path: Path) -> Iterator[Path]:
    """Inside, torch elastic's log (its agent's warnings, each failed worker's whole traceback: some 57 lines a
    failure) goes to `path`, created on its first line, instead of stderr: the launcher prints one line per failed
    rank and where the rest is. Forked workers inherit it."""
    logger = logging.getLogger("torch.distributed.elastic")
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


_RENDEZVOUS_TRIES = 3


def _launch_on_a_free_port(nproc: int, plan: Any, kwargs: dict[str, Any], failure_dir: str) -> None:
    """`mimo train`'s workers, forked (or spawned: `start_method`), the agent watching every half second."""
    run_on_a_free_port(nproc, _worker, (plan, kwargs, failure_dir), start_method(), monitor_interval=0.5)


def run_on_a_free_port(nproc: int, entrypoint: Callable[..., Any], args: tuple[Any, ...], method: str,
                       monitor_interval: float) -> None:
    """Run `entrypoint(*args)` on `nproc` local workers started by `method`; raises ChildFailedError.

    One node: the static rendezvous (torchrun's default; the agent hosts the store, and the dynamic c10d
    rendezvous spends seconds in `inspect.stack` for its event log, and when its port is taken it joins whatever
    store holds the port, another job's included, and hangs there). A port found free can be taken before the
    store binds it (NCCL binds ports at random): the bind then fails at once, before any worker started, and
    another port is tried."""
    for attempt in range(_RENDEZVOUS_TRIES):
        # LaunchConfig asks torch.cuda.is_available() (for NUMA defaults): through NVML, which leaves fork usable
        with nvml_check():
            launch_config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mimo-{uuid.uuid4().hex[:8]}",
                rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_configs={"rank": 0},
                max_restarts=0, monitor_interval=monitor_interval, start_method=method,
            )
        try:
            elastic_launch(launch_config, entrypoint)(*args)
            return
        except (RendezvousConnectionError, DistNetworkError):
            if attempt + 1 == _RENDEZVOUS_TRIES:
                raise


def start_method() -> str:
    """'fork' (workers inherit this process's imports), or 'spawn' once CUDA is initialized here: a forked
    child cannot use a CUDA context its parent created. (The CUDA runtime's availability check poisons fork
    too; nothing before the launch calls it, and `fork_safe.nvml_check` keeps torch's launcher from it.)"""
    import torch

    return "spawn" if torch.cuda.is_initialized() else "fork"


def _as_a_fresh_interpreter() -> None:
    """A forked worker's signal handlers as a spawned one's: default SIGTERM, SIGHUP and SIGQUIT (the agent's
    handlers raise instead, which a rank blocked in a collective would not see) and KeyboardInterrupt on SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class HangWatch:
    """A launcher thread that names and kills a worker whose heartbeat file is older than `hang_s`, or which has
    stayed in one phase longer than that phase's bound (`bounds`: phase -> seconds).

    The kill (SIGKILL ends even a stopped process) lets the elastic agent end the job as for any dead rank;
    the failure record written first, stamped with the rank's last heartbeat (or the start of its wait), makes the
    report lead with it.
    """

    def __init__(self, failure_dir: Path, hang_s: float | None = None, bounds: dict[str, float] | None = None) -> None:
        self.failure_dir, self.hang_s, self.bounds = failure_dir, hang_s or hang_seconds(), bounds or {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mimo-hang-watch", daemon=True)

    def __enter__(self) -> HangWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for beat in self.failure_dir.glob("heartbeat_*"):
                with contextlib.suppress(OSError, ValueError, KeyError):  # a worker that just ended removed its file
                    self._check(beat)

    def _check(self, beat: Path) -> None:
        """Name and kill the rank behind `beat` if its heartbeat is stale or it waits past its phase's bound."""
        last = beat.stat().st_mtime
        silent, state = time.time() - last, json.loads(beat.read_text())
        rank, pid, phase, since = int(beat.name.split("_")[1]), state["pid"], state["phase"], state["since"]
        waited, bound = time.time() - since, self.bounds.get(phase)
        if silent >= self.hang_s:
            reason = f"hung: no heartbeat for {silent:.0f} s (process {pid} {_process_state(pid)}, {_doing(state)})"
        elif bound is not None and waited > bound:
            reason = (f"waited {waited:.0f} s for {WAITS_ON[phase]}, past its bound of {bound:g} s (process {pid} "
                      f"{_process_state(pid)})")
            last = since
        else:
            return
        entry = {"rank": rank, "time": last, "error": f"{reason}; killed by the launcher"}
        (self.failure_dir / f"rank_{rank}.json").write_text(json.dumps(entry))
        beat.unlink()
        for process in [*_descendants(pid), pid]:  # its loader workers too: one blocked in a read outlives its
            with contextlib.suppress(ProcessLookupError):  # rank, and the agent waits for it forever
                os.kill(process, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (its data loader workers and theirs), from /proc (Linux; none elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def hang_seconds() -> float:
    """`MIMO_HANG_S` (default 60): a heartbeat older than this means a hung rank (tests lower it)."""
    text = os.environ.get("MIMO_HANG_S", str(HANG_S))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise LaunchError(f"MIMO_HANG_S={text!r}: must be a number of seconds > 0 (how long a silent rank may "
                          f"live before it is called hung; default {HANG_S:g})")
    return value


class LaunchError(ValueError):
    """The launcher's own settings (its environment) cannot work."""


def _doing(state: dict[str, Any]) -> str:
    """'waiting N s for WHAT' of a heartbeat's phase."""
    return f"waiting {time.time() - state['since']:.0f} s for {WAITS_ON.get(state['phase'], state['phase'])}"


def _process_state(pid: int) -> str:
    """'stopped', 'sleeping', ... from /proc (Linux), or '' where it cannot be read."""
    with contextlib.suppress(OSError, IndexError):
        return "state " + Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].strip()
    return "state unknown"


class _Heartbeat:
    """A worker's thread rewriting `failure_dir/heartbeat_<rank>` (its pid, phase and since when, as JSON) every
    `HEARTBEAT_S`: the file's age says whether the process lives, its phase what it waits on (as of that write: a
    process stopped between two writes is named with the phase of the last)."""

    def __init__(self, failure_dir: Path) -> None:
        self.path = failure_dir / f"heartbeat_{int(os.environ.get('RANK', '0'))}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mimo-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                self._write()

    def _write(self) -> None:
        """The state, replaced whole (the watch never reads half a file)."""
        phase, since = current()
        part = self.path.with_name(f".{self.path.name}.part")
        part.write_text(json.dumps({"pid": os.getpid(), "phase": phase, "since": since}))
        os.replace(part, self.path)


@record
def _worker(plan: Any, kwargs: dict[str, Any], failure_dir: str) -> None:
    """One rank: run the training loop of the (already checked) plan; record why it failed; a rank stopped by
    SIGTERM (`train.exit_signal_handler`) then dies of it (`end_as_signalled`: the agent's shutdown waits no more)."""
    from mimo.training.deadline import end_as_signalled
    from mimo.training.loop import run_training

    _as_a_fresh_interpreter()
    enter("start")  # a forked worker inherits the launcher's phase clock
    try:
        with _Heartbeat(Path(failure_dir)):
            run_training(plan, **kwargs)
    except BaseException as e:
        _write_failure(Path(failure_dir), e)
        raise
    end_as_signalled()


def _write_failure(failure_dir: Path, error: BaseException) -> None:
    """This rank's failure, stamped with the time it happened (written before the process exits)."""
    rank = int(os.environ.get("RANK", "0"))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = type(error).__name__ + (f": {lines[-1]}" if lines else "")
    trace = "".join(traceback.format_exception(error))
    entry = {"rank": rank, "time": time.time(), "error": reason, "traceback": trace}
    with contextlib.suppress(OSError):  # never let the report hide the error itself; the agent sees the exit
        (failure_dir / f"rank_{rank}.json").write_text(json.dumps(entry))


def _log_tracebacks(log: Path, records: list[dict[str, Any]]) -> None:
    """Append each failed rank's whole traceback (its failure record's) to the agent's log."""
    with contextlib.suppress(OSError), log.open("a") as out:
        for record in records:
            out.write(f"\n--- rank {record['rank']}: {record['error']}\n{record.get('traceback', '')}")


def _read_failures(failure_dir: Path) -> list[dict[str, Any]]:
    """Every worker's failure record, earliest first."""
    records = [json.loads(p.read_text()) for p in failure_dir.glob("rank_*.json")]
    return sorted(records, key=lambda r: (r["time"], r["rank"]))


def _last_phases(failure_dir: Path) -> dict[int, str]:
    """What each rank whose heartbeat file is left (one ended without its own exit: killed) was last doing."""
    phases = {}
    for beat in failure_dir.glob("heartbeat_*"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            phases[int(beat.name.split("_")[1])] = _doing(json.loads(beat.read_text()))
    return phases


def _failure_report(error: ChildFailedError, records: list[dict[str, Any]],
                    phases: dict[int, str] | None = None) -> list[str]:
    """The failed ranks, cause first, one line each (with what a rank ended from outside was doing: `phases`).

    A rank that died without raising (killed, out of memory) comes first: a rank that fails because a
    peer is gone always raises. Then the raised errors, earliest first.
    """
    recorded, phases = {rec["rank"] for rec in records}, phases or {}
    causes = [(rank, _reason(f) + (f" ({phases[rank]})" if rank in phases else ""))
              for rank, f in sorted(error.failures.items()) if rank not in recorded]
    causes += [(rec["rank"], rec["error"]) for rec in records]
    return [f"mimo train: {'error:' if i == 0 else 'then'} rank {rank} failed: {reason}"
            for i, (rank, reason) in enumerate(causes)]


def _reason(failure: Any) -> str:
    """The last line of a failed worker's error (its exception), or its exit code."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
