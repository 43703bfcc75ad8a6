"""Who owns a run directory: one run at a time, and a fresh run never mixes with an old one.

`claim_run_dir` runs in the `mimo train` parent (or rank 0 under torchrun) before any worker starts. It
checks that the run and checkpoint directories can be written, takes `RUN_DIR/.lock` and `CHECKPOINT_DIR/.lock`
(advisory `flock`s, released by the kernel when the process ends, however it ends) and writes its owner into
them, so a second run into either directory (two runs with one `checkpoint.dir` and two `log.dir`s too) is
refused at once, naming the holder. A fresh run (no `--resume`) into a directory that holds a run is refused,
unless `--restart` moves the old run aside (renamed, never deleted).

Each run directory names its run (`RUN_DIR/run.json`: an id made by the first run into it, once its start is
accepted) and every checkpoint records it (`mimo.json`'s extra): `--resume` in a directory that names a run refuses
a checkpoint another run wrote (`check_owner`) unless told `--adopt`. A directory that names no run yet (a fresh
one, or one from before runs were named) may start from any checkpoint: the run it then names is its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

from mimo.training.checkpoint import Checkpointer

LOCK = ".lock"
METRICS = "metrics.jsonl"
RUN = "run.json"  # the run's identity: {"id", "log_dir"}; a checkpoint's extra["run"] is its writer's
RUN_FILES = ("config.yaml", METRICS, "tb", RUN)  # what a run writes into log.dir, besides its checkpoints and locks


class RunDirError(RuntimeError):
    """A run directory that is in use, holds another run, or cannot be written."""


class RunDirLock:
    """The held locks of a run's directories (its run directory's, then its checkpoint directory's); released on
    `release()` or when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fds = path, [fd]

    def release(self) -> None:
        """Unlock and close (the files stay: an unlocked lock file is no lock)."""
        while self.fds:
            fd = self.fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def claim_run_dir(run_dir: Path, checkpoint_dir: Path, *, resume: bool, restart: bool = False) -> RunDirLock:
    """Check both directories, lock both, and refuse (or, with `restart`, move aside) an old run."""
    writable_dir(run_dir, "log.dir")
    writable_dir(checkpoint_dir, "checkpoint.dir")
    lock = _lock(run_dir, "log.dir")
    try:
        if checkpoint_dir.resolve() != run_dir.resolve():
            lock.fds += _lock(checkpoint_dir, "checkpoint.dir").fds
        previous = previous_run(run_dir, checkpoint_dir)
        if previous and restart:
            print(f"mimo train: moved the previous run aside: {_move_aside(run_dir, checkpoint_dir)}", flush=True)
            writable_dir(checkpoint_dir, "checkpoint.dir")
        elif previous and not resume:
            raise RunDirError(f"{run_dir} already holds a run ({previous}): --resume to continue it, or --restart "
                              f"to move it aside and start over (or choose another log.dir)")
    except BaseException:
        lock.release()
        raise
    return lock


def run_identity(run_dir: Path, create: bool = False) -> dict | None:
    """The run `run_dir` holds, {"id", "log_dir"} (made now if `create` and there is none yet; else None)."""
    path = run_dir / RUN
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        if not create:
            return None
    identity = {"id": uuid.uuid4().hex, "log_dir": str(run_dir.resolve())}
    path.write_text(json.dumps(identity))
    return identity


def check_owner(checkpoint: Path, writer: dict | None, run_dir: Path, adopt: bool) -> None:
    """`checkpoint` (written by run `writer`, None before runs were named) belongs to the run of `run_dir` (or that
    directory names no run yet: it starts from it), or `adopt` says to take it anyway; else a one-line `RunDirError`
    naming both runs. Before `run_identity(run_dir, create=True)`."""
    ours = run_identity(run_dir)
    if adopt or not writer or not ours or writer.get("id") == ours["id"]:
        return
    raise RunDirError(f"cannot resume from {checkpoint}: another run wrote it (log.dir {writer.get('log_dir')}), not "
                      f"this one ({run_dir}): do two runs share checkpoint.dir? --resume --adopt continues from it "
                      f"anyway, or choose another checkpoint.dir")


def writable_dir(directory: Path, key: str) -> None:
    """`directory` exists (made if need be) and a file can be created in it; a one-line error otherwise."""
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{key}: {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise RunDirError(f"{key}: {directory} is not a writable directory ({e.strerror or type(e).__name__})") \
            from None


def previous_run(run_dir: Path, checkpoint_dir: Path) -> str:
    """What of an earlier run the directories hold ('' if nothing): complete checkpoints, logged metrics."""
    found = []
    complete = Checkpointer(checkpoint_dir).complete()
    if complete:
        found.append(f"checkpoints up to {complete[-1].name} in {checkpoint_dir}")
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS)
    return ", ".join(found)


def _lock(directory: Path, key: str) -> RunDirLock:
    """Take `directory/.lock` without waiting and write who holds it; if another process holds it, name it (and
    `key`, the setting that chose the directory)."""
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        which = "" if key == "log.dir" else f"{key} "
        raise RunDirError(f"{which}{directory} is in use by another run ({holder}); wait for it to end or choose "
                          f"another {key}") from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return RunDirLock(path, fd)


def _holder(fd: int) -> str:
    """'pid P on host H since T', as the holder wrote it into the lock file."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on host {owner['host']} since {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _move_aside(run_dir: Path, checkpoint_dir: Path) -> str:
    """Rename what the old run wrote (`RUN_FILES`, its checkpoints) into `RUN_DIR.<time>`, and an outside checkpoint
    directory's entries next to itself; the locks stay where they are (this run holds them all along), and anything
    else in the run directory (the user's own files) stays where it is."""
    run_dir, checkpoint_dir = run_dir.resolve(), checkpoint_dir.resolve()  # log.dir '.' has no name of its own
    stamp = time.strftime("%Y%m%d-%H%M%S")
    locks = {(run_dir / LOCK).resolve(), (checkpoint_dir / LOCK).resolve()}
    aside = _unused(run_dir.with_name(f"{run_dir.name}.{stamp}"))
    aside.mkdir()
    ours = [run_dir / name for name in RUN_FILES]
    if checkpoint_dir == run_dir:
        ours += sorted(run_dir.glob("step_*"))
    elif checkpoint_dir.is_relative_to(run_dir):
        ours.append(run_dir / checkpoint_dir.relative_to(run_dir).parts[0])
    for entry in ours:
        if not entry.exists():
            continue
        if entry.is_dir() and any(lock.is_relative_to(entry.resolve()) for lock in locks):
            _move_entries(entry, aside / entry.name, locks)  # a checkpoint directory: its lock stays
        else:
            entry.rename(aside / entry.name)
    moved = str(aside)
    if checkpoint_dir.exists() and not checkpoint_dir.is_relative_to(run_dir):
        outside = _unused(checkpoint_dir.with_name(f"{checkpoint_dir.name}.{stamp}"))
        _move_entries(checkpoint_dir, outside, locks)
        moved += f" (checkpoints: {outside})"
    return moved


def _move_entries(source: Path, target: Path, locks: set[Path]) -> None:
    """Rename every entry of `source` into the new directory `target`, but the `locks` (a directory holding one
    is moved entry by entry, the lock left in place)."""
    target.mkdir()
    for entry in source.iterdir():
        resolved = entry.resolve()
        if resolved in locks:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(lock.is_relative_to(resolved) for lock in locks):
            _move_entries(entry, target / entry.name, locks)
        else:
            entry.rename(target / entry.name)


def _unused(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
