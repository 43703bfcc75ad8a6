"""`Deadline`: the ranks stop after the same step, whichever rank's clock passes the deadline first or receives
SIGTERM (its votes summed over the world, as `MimoTrainer.train_step` sums them in its own all-reduce)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import torch
import torch.distributed as dist

from mimo.testing import run_distributed
from mimo.training.deadline import Deadline, end_as_signalled


def agreed(deadline: Deadline) -> bool:
    """The step's sum of every rank's votes (one all-reduce here, inside the step in a run)."""
    summed = torch.tensor(deadline.votes(), dtype=torch.float64)
    dist.all_reduce(summed)
    return deadline.agreed(tuple(summed.tolist()))


def stops_on_each_rank(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    """A 1-minute deadline with rank 1 started 10 minutes ago and rank 0 just now; with both just started; none."""
    now = time.monotonic()
    late = now - (600.0 if rank == 1 else 0.0)
    return agreed(Deadline(1.0, late)), agreed(Deadline(1.0, now)), Deadline(None, late).agreed((1.0, 1.0))


def test_one_rank_past_the_deadline_stops_every_rank():
    assert run_distributed(stops_on_each_rank, 2) == [(True, False, False), (True, False, False)]


def steps_of_a_run_started_long_ago(rank: int, world_size: int, tmp: str) -> int:
    """`run_training` given when `mimo train` started (two minutes ago, its checks of a checkpoint say), with a
    1-minute limit: the deadline counts that time, so the run stops after its first step."""
    from mimo.training.loop import run_training
    from mimo.training.plan import plan_run
    from mimo.training.run_config import parse_run_config

    config = parse_run_config({
        "model": {"preset": "tiny"},
        "parallelism": {"images": {"data_parallel_size": 2}, "language": {"data_parallel_size": 2}},
        "train": {"steps": 4, "global_batch_size": 2, "dtype": "float64", "exit_duration_in_mins": 1.0},
        "data": {"name": "synthetic", "num_samples": 8, "num_workers": 0}, "eval": {"enabled": False},
        "checkpoint": {"interval": 0}, "log": {"dir": f"{tmp}/run"}})
    return run_training(plan_run(config, world_size), quiet=True, started=time.monotonic() - 120.0)["step"]


def test_the_deadline_counts_from_when_mimo_train_started(tmp_path):
    assert run_distributed(steps_of_a_run_started_long_ago, 2, str(tmp_path)) == [1, 1]


def signalled_on_each_rank(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    """The signal handler on, no time limit: SIGTERM reaches rank 1 only (it is only noted, then voted). Each rank's
    (stops, signalled, timed out)."""
    deadline = Deadline(None, on_signal=True)
    with deadline.watching():
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return agreed(deadline), deadline.signalled, deadline.timed_out


def test_sigterm_on_one_rank_stops_every_rank():
    assert run_distributed(signalled_on_each_rank, 2) == [(True, True, False), (True, True, False)]


def test_the_handler_is_put_back_and_a_process_forked_under_it_ignores_sigterm():
    """A process forked while the handler is installed ignores SIGTERM (a scheduler signals every process of the job;
    the loader's own workers: `ignore_sigterm`, tested end to end in test_train_cli). After the loop the process's
    own handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    deadline = Deadline(None, on_signal=True)
    with deadline.watching():
        assert signal.getsignal(signal.SIGTERM) == deadline._receive
        ready, told = os.pipe()
        go, release = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: say it runs (a signal in fork's own window is dropped), wait to be released
            os.write(told, b"1")
            os.read(go, 1)
            os._exit(7)
        os.read(ready, 1)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)  # the signal is delivered asynchronously: time for it to end the child, were it to
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still running
        os.write(release, b"1")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7  # it ended by itself, not by the signal
        assert deadline.votes() == (0.0, 0.0)  # the child's signal is not the parent's
    assert signal.getsignal(signal.SIGTERM) == before


def _stop_for_a_deferred_sigterm(notice: bool) -> None:
    """A rank's end: a SIGTERM noted while watching (if `notice`), then `end_as_signalled`, then a normal return."""
    deadline = Deadline(None, on_signal=True)
    with deadline.watching():
        if notice:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    end_as_signalled()


def test_a_rank_stopped_by_sigterm_dies_of_it_once_done():
    """Issue 27: a worker that returned after a SIGTERM stop waited for torch's elastic agent to collect its result,
    which the agent, shutting down on that SIGTERM, never did (its 30 s grace, then SIGKILL). It dies of the signal
    it deferred instead; one that noted none returns."""
    ctx = multiprocessing.get_context("fork")
    for notice, exitcode in ((True, -signal.SIGTERM), (False, 0)):
        child = ctx.Process(target=_stop_for_a_deferred_sigterm, args=(notice,))
        child.start()
        child.join(30)
        assert child.exitcode == exitcode
