"""A checkpoint's files and their integrity: step directories, atomic renames, the `COMPLETE` marker's sizes and
SHA-256 hashes, and our JSON (DCP's own files are read by `mimo.torch_compat.SafeReader`: loading is not executing).

No knowledge of models or trainers here: `checkpoint_state` assembles what is saved, `checkpoint` orders the two.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

MARKER, INFO = "COMPLETE", "mimo.json"
HASH = "sha256"  # the marker's key for {file: hex digest}; a checkpoint written before hashes has none
_CHUNK = 1 << 22
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, or that does not fit the model."""


# -- where checkpoints are ---------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name says (`step_00000004`: 4), None for any other name."""
    named = _STEP_DIR.match(path.name)
    return int(named[1]) if named else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Every complete checkpoint under `root` (named `step_N` and holding the marker), oldest first."""
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found) if (p / MARKER).is_file()]


def weights_path(path: str | Path) -> Path:
    """Where a pretrained checkpoint's weights are: `path` if it is a checkpoint, else the newest complete
    checkpoint of the run directory (`path/checkpoints`) or checkpoints directory it names, else `path` (and
    `open_checkpoint` then says what is wrong)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        done = complete_checkpoints(root)
        if done:
            return done[-1]
    return path


def check_step(path: Path, marker: dict, info: dict) -> None:
    """The step in the directory name, the marker and `mimo.json` agree."""
    named = _STEP_DIR.match(path.name)
    steps = {"the directory name": int(named[1]) if named else info["step"], MARKER: marker.get("step"),
             INFO: info["step"]}
    if len(set(steps.values())) > 1:
        said = ", ".join(f"{v!r} in {k}" for k, v in steps.items())
        raise CheckpointError(f"checkpoint {path} disagrees about its step ({said}): it was edited or moved")


# -- sizes and hashes --------------------------------------------------------------------------------------
def check_sizes(path: Path, marker: dict) -> None:
    """Every file the marker lists has its recorded size: a truncated or missing one is caught before loading."""
    for name, size in marker.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes instead of {size}"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {name} is {state}")


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file's size but the marker's, for the marker."""
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """{name: SHA-256 hex digest} of files in `directory`, read in 4 MiB chunks on a few threads (hashlib
    releases the GIL), so the cost is one read of the files at the disk's pace."""
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _hash_file(directory / n), names), strict=True))


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gathered_hashes(directory: Path) -> dict[str, str]:
    """The hashes of every file in `directory` (DCP's files), each rank hashing its share; on every rank."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    world, rank_ = (dist.get_world_size(), dist.get_rank()) if distributed() else (1, 0)
    local = file_hashes(directory, names[rank_::world])
    gathered = [local]
    if distributed():
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    return dict(sorted((name, digest) for part in gathered for name, digest in part.items()))


def verify_hashes(path: Path, expected: dict[str, str]) -> None:
    """Every file hashed in the marker has that hash still (files are hashed in parallel threads)."""
    actual = file_hashes(path, sorted(expected))
    for name, digest in expected.items():
        if actual[name] != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its {HASH} hash in "
                                  f"{MARKER} (changed or replaced after the save)")


# -- atomic directories --------------------------------------------------------------------------------------
def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory to its final name, replacing an older save of the same step."""
    if final.exists():
        aside = final.with_name(final.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(final)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- JSON --------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Write JSON durably: a temporary file, fsync, then rename."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path.parent} has a corrupt {path.name}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path.parent} has a corrupt {path.name}: not a JSON object")
    return data


def check_json(data: Any, what: str = "extra") -> None:
    """`data` can be stored as JSON (it is never pickled), or a `CheckpointError` saying why not."""
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must be JSON-serializable (it is stored as JSON, never pickled): {e}") from None


# -- errors and ranks ----------------------------------------------------------------------------------------
def cause(e: BaseException) -> str:
    """'on rank(s) R (Type: message)' for DCP's gathered failure, '(Type: message)' for any other; a record that
    `weights_only` refused, by its reason alone (torch's message is a page of advice around it)."""
    first, where = e, ""
    if isinstance(e, CheckpointException) and e.failures:
        first, where = e.failures[min(e.failures)][0], f"on rank(s) {sorted(e.failures)} "
    refused = _WEIGHTS_ONLY.search(str(first))
    if refused:
        return f"{where}(not a tensor record; weights_only refused it, nothing run: {one_line(refused[1])})"
    return f"{where}({type(first).__name__}: {one_line(first)})"


_WEIGHTS_ONLY = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, cut at 200 characters."""
    return " ".join(str(e).split())[:200]


def distributed() -> bool:
    """Whether a default process group exists (else a checkpoint is one process's)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if distributed():
        dist.barrier()
