"""Who owns a run directory: one run at a time, and a fresh run never mixes with an old one.

`claim_run_dir` runs in the `mimo train` parent (or rank 0 under torchrun) before any worker starts. It
checks that the run and checkpoint directories can be written, takes `RUN_DIR/.lock` (an advisory
`flock`, released by the kernel when the process ends, however it ends) and writes its owner into it, so a
second run into the same directory is refused at once, naming the holder. A fresh run (no `--resume`) into
a directory that holds a run is refused, unless `--restart` moves the old run aside (renamed, never
deleted).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from mimo.training.checkpoint import Checkpointer

LOCK = ".lock"
METRICS = "metrics.jsonl"
RUN_FILES = ("config.yaml", METRICS, "tb")  # what a run writes into log.dir, besides its checkpoints and the lock


class RunDirError(RuntimeError):
    """A run directory that is in use, holds another run, or cannot be written."""


class RunDirLock:
    """The held lock of a run directory; released on `release()` or when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Unlock and close (the file stays: an unlocked lock file is no lock)."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def claim_run_dir(run_dir: Path, checkpoint_dir: Path, *, resume: bool, restart: bool = False) -> RunDirLock:
    """Check both directories, lock the run directory, and refuse (or, with `restart`, move aside) an old run."""
    writable_dir(run_dir, "log.dir")
    writable_dir(checkpoint_dir, "checkpoint.dir")
    lock = _lock(run_dir)
    try:
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


def _lock(run_dir: Path) -> RunDirLock:
    """Take `run_dir/.lock` without waiting and write who holds it; if another process holds it, name it."""
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another run ({holder}); wait for it to end or choose another "
                          f"log.dir") from None
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
    directory next to itself; anything else in the run directory (the user's own files) stays where it is."""
    run_dir, checkpoint_dir = run_dir.resolve(), checkpoint_dir.resolve()  # log.dir '.' has no name of its own
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = _unused(run_dir.with_name(f"{run_dir.name}.{stamp}"))
    aside.mkdir()
    ours = [run_dir / name for name in RUN_FILES]
    if checkpoint_dir == run_dir:
        ours += sorted(run_dir.glob("step_*"))
    elif checkpoint_dir.is_relative_to(run_dir):
        ours.append(run_dir / checkpoint_dir.relative_to(run_dir).parts[0])
    for entry in ours:
        if entry.exists():
            entry.rename(aside / entry.name)
    moved = str(aside)
    if checkpoint_dir.exists() and not checkpoint_dir.is_relative_to(run_dir):
        outside = _unused(checkpoint_dir.with_name(f"{checkpoint_dir.name}.{stamp}"))
        checkpoint_dir.rename(outside)
        moved += f" (checkpoints: {outside})"
    return moved


def _unused(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
