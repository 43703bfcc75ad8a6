"""Run-directory ownership: one run at a time, and an old run is never mixed with or lost to a fresh one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mimo.training.checkpoint import MARKER
from mimo.training.run_dir import RunDirError, check_owner, claim_run_dir, run_identity


def old_run(run_dir: Path, checkpoint_dir: Path, steps: tuple[int, ...] = (20, 40)) -> None:
    """What a finished run leaves: complete checkpoints (marker only: enough to count) and metrics."""
    for step in steps:
        (checkpoint_dir / f"step_{step:08d}").mkdir(parents=True)
        (checkpoint_dir / f"step_{step:08d}" / MARKER).write_text("{}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    (run_dir / "config.yaml").write_text("old: true\n")


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    lock = claim_run_dir(run, run / "checkpoints", resume=False)
    with pytest.raises(RunDirError) as e:  # a second open file description: flock refuses it as another process's
        claim_run_dir(run, run / "checkpoints", resume=True)
    assert str(e.value).startswith(f"{run} is in use by another run (pid {os.getpid()} on host "
                                   f"{socket.gethostname()} since ")
    assert str(e.value).endswith("); wait for it to end or choose another log.dir")
    lock.release()
    claim_run_dir(run, run / "checkpoints", resume=True).release()  # free again once released


def test_a_fresh_run_into_an_old_one_is_refused_and_nothing_changes(tmp_path):
    run = tmp_path / "run"
    old_run(run, run / "checkpoints")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock")
    with pytest.raises(RunDirError) as e:
        claim_run_dir(run, run / "checkpoints", resume=False)
    assert str(e.value) == (f"{run} already holds a run (checkpoints up to step_00000040 in {run / 'checkpoints'}, "
                            f"metrics.jsonl): --resume to continue it, or --restart to move it aside and start over "
                            f"(or choose another log.dir)")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock") == before
    claim_run_dir(run, run / "checkpoints", resume=True).release()  # the lock was released by the refusal


def test_restart_moves_the_old_run_aside_and_deletes_nothing(tmp_path, capsys):
    run, outside = tmp_path / "run", tmp_path / "ckpt"  # checkpoint.dir outside the run directory too
    old_run(run, outside)
    lock = claim_run_dir(run, outside, resume=False, restart=True)
    lock.release()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.")]
    assert capsys.readouterr().out == f"mimo train: moved the previous run aside: {aside} (checkpoints: {moved})\n"
    assert sorted(p.name for p in aside.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert sorted(p.name for p in moved.iterdir()) == ["step_00000020", "step_00000040"]
    assert sorted(p.name for p in run.iterdir()) == [".lock"] and [p.name for p in outside.iterdir()] == [".lock"]


def test_metrics_alone_count_as_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\): --resume"):
        claim_run_dir(run, run / "checkpoints", resume=False)
    (run / "metrics.jsonl").write_text("")  # an empty file is no run
    claim_run_dir(run, run / "checkpoints", resume=False).release()


def test_unusable_directories(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match=rf"^log.dir: {blocker} is a file, not a directory$"):
        claim_run_dir(blocker, tmp_path / "c", resume=False)
    with pytest.raises(RunDirError, match=rf"^checkpoint.dir: {blocker / 'x'} is not a writable directory \(Not a "
                                          rf"directory\)$"):
        claim_run_dir(tmp_path / "run", blocker / "x", resume=False)


def test_two_runs_with_one_checkpoint_directory_are_refused(tmp_path):
    """Issue 27, bad 2: two runs with one checkpoint.dir and two log.dirs both ran and replaced each other's
    checkpoints; the lock covers the checkpoint directory too."""
    shared = tmp_path / "ckpt"
    lock = claim_run_dir(tmp_path / "a", shared, resume=False)
    with pytest.raises(RunDirError) as e:
        claim_run_dir(tmp_path / "b", shared, resume=False)
    assert str(e.value).startswith(f"checkpoint.dir {shared} is in use by another run (pid {os.getpid()} on host ")
    assert str(e.value).endswith("); wait for it to end or choose another checkpoint.dir")
    claim_run_dir(tmp_path / "b", tmp_path / "other", resume=False).release()  # its run directory was left free
    lock.release()
    claim_run_dir(tmp_path / "b", shared, resume=False).release()


def test_a_checkpoint_names_its_run_and_another_runs_is_refused_unless_adopted(tmp_path):
    """Issue 27, bad 2: A's --resume loaded the checkpoints B wrote into their shared checkpoint.dir; each run
    directory names its run (run.json: kept by --resume, new after --restart) and a resume there refuses a
    checkpoint another run wrote. A directory that names no run yet may start from any checkpoint."""
    a, b, checkpoint = tmp_path / "a", tmp_path / "b", tmp_path / "ckpt" / "step_00000020"
    claim_run_dir(a, tmp_path / "ckpt", resume=False).release()
    writer = run_identity(a, create=True)
    assert writer == {"id": writer["id"], "log_dir": str(a.resolve())}
    assert run_identity(a, create=True) == writer  # the same run, resumed
    check_owner(checkpoint, writer, a, adopt=False)
    check_owner(checkpoint, None, a, adopt=False)  # written before runs were named: taken
    check_owner(checkpoint, writer, b, adopt=False)  # b names no run yet: it starts from A's checkpoint
    claim_run_dir(b, tmp_path / "other", resume=False).release()
    run_identity(b, create=True)
    with pytest.raises(RunDirError) as e:
        check_owner(checkpoint, writer, b, adopt=False)
    assert str(e.value) == (f"cannot resume from {checkpoint}: another run wrote it (log.dir {a.resolve()}), not this "
                            f"one ({b}): do two runs share checkpoint.dir? --resume --adopt continues from it anyway, "
                            f"or choose another checkpoint.dir")
    check_owner(checkpoint, writer, b, adopt=True)
    old_run(a, tmp_path / "ckpt")
    claim_run_dir(a, tmp_path / "ckpt", resume=False, restart=True).release()
    assert run_identity(a) is None  # --restart moved the old run's name aside with it


def test_restart_moves_only_what_mimo_wrote(tmp_path, capsys, monkeypatch):
    """Issue 27: `--set log.dir=. --restart` was a ValueError traceback ('.' has an empty name), and --restart moved
    the user's own files that sat in log.dir along with the run."""
    work = tmp_path / "work"
    old_run(work, work / "checkpoints")
    (work / "notes.txt").write_text("mine")
    (work / "tb").mkdir()
    monkeypatch.chdir(work)
    claim_run_dir(Path("."), Path("checkpoints"), resume=False, restart=True).release()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("work.")]
    assert capsys.readouterr().out == f"mimo train: moved the previous run aside: {aside}\n"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "tb"]
    assert sorted(p.name for p in work.iterdir()) == [".lock", "checkpoints", "notes.txt"]
    assert [p.name for p in (work / "checkpoints").iterdir()] == [".lock"]  # the held lock stays
