"""`mimo train` without torchrun: start the workers with PyTorch's elastic launcher, used as a library.

One node, `nproc` workers, no restarts. When a worker raises, the agent stops the others within its
monitor interval and we report which rank failed and why, in one line each; Ctrl-C stops everything.
"""

from __future__ import annotations

import signal
import socket
import sys
import uuid
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(config: dict[str, Any], nproc: int, **kwargs: Any) -> int:
    """Run `_worker(config, **kwargs)` on `nproc` local processes; 0, or 1 with each failed rank named."""
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mimo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
        monitor_interval=0.5, start_method="spawn",
    )
    try:
        elastic_launch(launch_config, _worker)(config, kwargs)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            print(f"mimo train: error: rank {rank} failed: {_reason(failure)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SignalException) as e:
        name = signal.Signals(getattr(e, "sigval", signal.SIGINT)).name
        print(f"mimo train: stopped by {name}; workers ended, and only complete checkpoints are ever loaded",
              file=sys.stderr)
        return 130
    return 0


@record
def _worker(config: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """One rank: parse the (already validated) config and run the training loop."""
    from mimo.training.loop import run_training
    from mimo.training.run_config import parse_run_config

    run_training(parse_run_config(config), **kwargs)


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
