"""The launcher: how `mimo train` names the rank that failed first, and its retry of a port lost to a race."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import mimo.launch
from mimo.launch import _failure_report, _last_phases, _read_failures, _write_failure, launch


def _failure(rank: int, exitcode: int, tmp_path) -> ProcessFailure:
    """A failure as the elastic agent reports it: no error file when the process died without raising."""
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                          error_file=str(tmp_path / f"missing_{rank}.json"))


def test_the_rank_that_raised_first_is_named_even_if_a_peer_exited_sooner(tmp_path, monkeypatch):
    # rank 1 raises; rank 0's collective then fails and rank 0 exits before rank 1 does, so the agent
    # saw only rank 0: the report must still lead with rank 1, by the time each error happened
    monkeypatch.setenv("RANK", "1")
    _write_failure(tmp_path, RuntimeError("injected fault at step 2"))
    monkeypatch.setenv("RANK", "0")
    _write_failure(tmp_path, RuntimeError("[gloo] Connection closed by peer\n  on rank 0"))
    records = _read_failures(tmp_path)
    assert [r["rank"] for r in records] == [1, 0]
    error = ChildFailedError("mimo", {0: _failure(0, 1, tmp_path)})
    assert _failure_report(error, records) == [
        "mimo train: error: rank 1 failed: RuntimeError: injected fault at step 2",
        "mimo train: then rank 0 failed: RuntimeError: on rank 0",
    ]


def test_a_rank_killed_without_raising_comes_first(tmp_path):
    # rank 3 was killed (out of memory): it left no record, and rank 2 failed because it was gone
    (tmp_path / "rank_2.json").write_text(json.dumps({"rank": 2, "time": 5.0, "error": "RuntimeError: peer"}))
    error = ChildFailedError("mimo", {2: _failure(2, 1, tmp_path), 3: _failure(3, -9, tmp_path)})
    first, then = _failure_report(error, _read_failures(tmp_path))
    assert first.startswith("mimo train: error: rank 3 failed: ") and "SIGKILL" in first
    assert then == "mimo train: then rank 2 failed: RuntimeError: peer"


PORT_TAKEN = """
import socket, sys
import mimo.launch as launch
from mimo.cli import main

held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()  # the port `_free_port` finds first is taken before the agent's store binds it
ports, free = [held.getsockname()[1]], launch._free_port
launch._free_port = lambda: ports.pop() if ports else free()
code = main(["train", sys.argv[1], "--quiet"])
print("first port tried:", not ports)
sys.exit(code)
"""


def test_a_port_taken_before_the_store_binds_it_is_retried(tmp_path):
    """The launcher's race: a port found free is taken (NCCL binds ports at random) before the agent's store
    binds it. The bind fails before any worker starts, and the launch goes on on another port."""
    import subprocess
    import sys

    from tests.test_train_cli import steps_and_losses, write_config

    one_rank = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 0}}
    path, run_dir = write_config(tmp_path, parallelism=one_rank, train={"steps": 2})
    done = subprocess.run([sys.executable, "-c", PORT_TAKEN, str(path)], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first port tried: True" in done.stdout
    assert sorted(steps_and_losses(run_dir)) == [1, 2]




def _plan(run_dir: Path) -> SimpleNamespace:
    """What `launch` reads of a plan: the run directory (its agent log) and the data bound."""
    return SimpleNamespace(config=SimpleNamespace(run_dir=run_dir, data=SimpleNamespace(timeout_s=600)))


def test_ranks_dead_of_sigterm_alone_are_the_job_stopped_by_it(monkeypatch, capsys, tmp_path):
    """A scheduler that signals the ranks but not the launcher: they stop, checkpoint and die of the SIGTERM they
    deferred (`deadline.end_as_signalled`); the agent sees a death by SIGTERM, which is the job stopped by it (143),
    not a failure. A rank that raised is still a failure."""
    def stopped(nproc, plan, kwargs, failure_dir):
        raise ChildFailedError("mimo", {0: _failure(0, -15, Path(failure_dir))})

    monkeypatch.setattr(mimo.launch, "_launch_on_a_free_port", stopped)
    assert launch(_plan(tmp_path), 2) == 143
    assert capsys.readouterr().err == ("mimo train: stopped by SIGTERM; workers ended, and only complete checkpoints "
                                       "are ever loaded\n")

    def raised(nproc, plan, kwargs, failure_dir):
        (Path(failure_dir) / "rank_1.json").write_text(json.dumps({"rank": 1, "time": 1.0, "error": "RuntimeError: x"}))
        raise ChildFailedError("mimo", {0: _failure(0, -15, Path(failure_dir))})

    monkeypatch.setattr(mimo.launch, "_launch_on_a_free_port", raised)
    assert launch(_plan(tmp_path), 2) == 1


def test_a_rank_killed_from_outside_is_named_with_what_it_was_doing(tmp_path):
    """Issue 27: a rank ended by the agent (its peer's collective timed out first) says what it waited on."""
    (tmp_path / "heartbeat_3").write_text(json.dumps({"pid": 7, "phase": "data", "since": time.time() - 300}))
    error = ChildFailedError("mimo", {3: _failure(3, -15, tmp_path)})
    (line,) = _failure_report(error, _read_failures(tmp_path), _last_phases(tmp_path))
    assert line.startswith("mimo train: error: rank 3 failed: ")
    assert line.endswith("(waiting 300 s for the next batch from the data loader (a read that never returns: a "
                         "stalled file system?))")
