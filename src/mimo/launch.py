"""`mimo train` without torchrun: start the workers with PyTorch's elastic launcher, used as a library.

One node, `nproc` workers, no restarts. When a worker raises, the agent stops the others within its
monitor interval and we report which rank failed first and why; Ctrl-C stops everything.

Which rank failed first is decided by time, not by which exit the agent happened to notice first: a
rank that raises makes its peers' collectives fail a moment later, and those peers may exit sooner.
Each worker writes `{rank, time, error}` to a shared directory as it raises, before its sockets close.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(config: dict[str, Any], nproc: int, **kwargs: Any) -> int:
    """Run `_worker(config, **kwargs)` on `nproc` local processes; 0, or 1 with the failed ranks named."""
    with tempfile.TemporaryDirectory(prefix="mimo-failures-") as failure_dir:
        try:
            _launch_on_a_free_port(nproc, config, kwargs, failure_dir)
        except ChildFailedError as e:
            for line in _failure_report(e, _read_failures(Path(failure_dir))):
                print(line, file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SignalException) as e:
            name = signal.Signals(getattr(e, "sigval", signal.SIGINT)).name
            print(f"mimo train: stopped by {name}; workers ended, and only complete checkpoints are ever loaded",
                  file=sys.stderr)
            return 130
    return 0


_RENDEZVOUS_TRIES = 3


def _launch_on_a_free_port(nproc: int, config: dict[str, Any], kwargs: dict[str, Any], failure_dir: str) -> None:
    """Start the agent's rendezvous store on a free port, and the workers. A port found free can be taken before
    the store binds it (NCCL binds ports at random): this process then fails at once (`is_host`, rather than
    waiting a minute as a client of nobody), before any worker started, and tries another port."""
    for attempt in range(_RENDEZVOUS_TRIES):
        launch_config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mimo-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_configs={"is_host": True},
            max_restarts=0, monitor_interval=0.5, start_method="spawn",
        )
        try:
            elastic_launch(launch_config, _worker)(config, kwargs, failure_dir)
            return
        except RendezvousConnectionError:
            if attempt + 1 == _RENDEZVOUS_TRIES:
                raise


@record
def _worker(config: dict[str, Any], kwargs: dict[str, Any], failure_dir: str) -> None:
    """One rank: parse the (already validated) config and run the training loop; record why it failed."""
    from mimo.training.loop import run_training
    from mimo.training.run_config import parse_run_config

    try:
        run_training(parse_run_config(config), **kwargs)
    except BaseException as e:
        _write_failure(Path(failure_dir), e)
        raise


def _write_failure(failure_dir: Path, error: BaseException) -> None:
    """This rank's failure, stamped with the time it happened (written before the process exits)."""
    rank = int(os.environ.get("RANK", "0"))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = type(error).__name__ + (f": {lines[-1]}" if lines else "")
    entry = {"rank": rank, "time": time.time(), "error": reason}
    with contextlib.suppress(OSError):  # never let the report hide the error itself; the agent sees the exit
        (failure_dir / f"rank_{rank}.json").write_text(json.dumps(entry))


def _read_failures(failure_dir: Path) -> list[dict[str, Any]]:
    """Every worker's failure record, earliest first."""
    records = [json.loads(p.read_text()) for p in failure_dir.glob("rank_*.json")]
    return sorted(records, key=lambda r: (r["time"], r["rank"]))


def _failure_report(error: ChildFailedError, records: list[dict[str, Any]]) -> list[str]:
    """The failed ranks, cause first, one line each.

    A rank that died without raising (killed, out of memory) comes first: a rank that fails because a
    peer is gone always raises. Then the raised errors, earliest first.
    """
    recorded = {rec["rank"] for rec in records}
    causes = [(rank, _reason(f)) for rank, f in sorted(error.failures.items()) if rank not in recorded]
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
