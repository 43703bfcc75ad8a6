"""Layout-independent, atomic training checkpoints on `torch.distributed.checkpoint` (DCP).

Every tensor is saved under its single-process name (`language_model.layers.0.mlp.up_proj.weight`,
`optimizer.<that name>.exp_avg`, `rng_state`), each sharded one as a DTensor, so DCP can reshard it
onto any other layout on load: TP/DP/PP sizes, deployment and world size may all change. A tied head
on a later pipeline stage is never saved: it loads from the embedding it is tied to (`init_aliases`).

A part of the model that is frozen and read from a Hugging Face directory (`HFPart`: the vision encoder, the
projector, the language model) is left out too, unless `checkpoint.save_frozen_hf_weights`: its weights are
already on disk and every run rebuilds them from there. `mimo.json` records where they come from (the directory
and its `fingerprint`); every load takes them from the loading run's own directory, which must match it.

On disk (one directory per step; DCP's own files plus two JSON files, nothing of ours is pickled):
    root/step_00000004/
        __<rank>_0.distcp   tensor data written by DCP (one `torch.save` record per tensor chunk, read back
                            by DCP with `torch.load(weights_only=True)`)
        .metadata           DCP's index of the tensors: a pickle written by DCP itself; read back with an
                            allow-list unpickler (`SafeReader`), never a plain `pickle.load`; every entry must
                            be a tensor (as mimo writes it) and read from a file the marker lists, checked before
                            anything is loaded: a bytes entry (which torch would unpickle) is refused
        mimo.json           format, step, scheduler states, the caller's `extra`, the parts left out (JSON)
        COMPLETE            written last, after every rank has finished: step, every file's size and its
                            SHA-256 hash (each rank hashes a share of the files it just wrote; the parent
                            re-hashes them all before a resume, on threads: one read of the checkpoint;
                            every other reader, `export-hf`, `generate` and a pretrained checkpoint, does too)
    root/step_00000006.tmp/ a save in progress, or one that was interrupted: never loaded

This module orders a save and a load; what it orders lives by concern: `checkpoint_files` (directories, the
marker's sizes and hashes, JSON, the safe reader), `checkpoint_state` (what is saved of a trainer and how it is
restored; `Trainer` says what a trainer must offer) and `hf_provenance` (the parts left out and where they come from).
"""

from __future__ import annotations

import errno
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from mimo.ddp_shards import sharding
from mimo.torch_compat import DCP_METADATA, SafePlanner, SafeReader, storage_files
from mimo.training.checkpoint_files import (
    HASH,
    INFO,
    MARKER,
    CheckpointError,
    barrier,
    cause,
    check_json,
    check_sizes,
    check_step,
    checkpoint_step,
    complete_checkpoints,
    distributed,
    file_hashes,
    file_sizes,
    fsync_dir,
    gathered_hashes,
    move_into_place,
    one_line,
    rank,
    read_json,
    verify_hashes,
    weights_path,
    write_json,
)
from mimo.training.checkpoint_state import (
    OPTIMIZER,
    RNG,
    HasModel,
    Targets,
    Trainer,
    agree_on_keys,
    copy_into_shards,
    gather_schedulers,
    key_problems,
    model_targets,
    optimizer_targets,
    restore_optimizers,
    restore_schedulers,
    scheduler_problems,
    storage_problem,
    trainer_state,
)
from mimo.training.hf_provenance import (
    HF_WEIGHTS,
    HFPart,
    check_hf_records,
    left_out_records,
    omitted_prefixes,
    parts_left_out,
)

# mimo.json's format: 2 for a checkpoint that leaves parts out (`weights_from_hf`), so that a mimo from before
# reads "has format 2; this mimo reads 1" rather than missing keys; 1 for one that holds every parameter
FORMAT, FORMAT_LEAVING_OUT = 1, 2


class Checkpointer:
    """Saves and loads training checkpoints under `root`, keeping the newest `keep` (all if None); `hf_parts`:
    the run's parts read from Hugging Face directories (those `omitted` are not saved; loads take them from there)."""

    def __init__(self, root: str | Path, keep: int | None = None, hf_parts: Sequence[HFPart] = ()) -> None:
        """Remember where checkpoints live and how many to keep; nothing is touched yet."""
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep must be at least 1 (or None to keep all), got {keep}")
        self.root, self.keep, self.hf_parts = Path(root), keep, tuple(hf_parts)

    # -- where checkpoints are ---------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        """The directory of step `step`'s checkpoint."""
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Every complete checkpoint (named `step_N` and holding the marker), oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint; partial and temporary directories are ignored."""
        done = self.complete()
        return done[-1] if done else None

    # -- save ------------------------------------------------------------------------------------------
    def save(self, step: int, trainer: Trainer, extra: dict) -> Path:
        """Write step `step` of `trainer` (a collective: every rank calls it, stub ranks too); return its path.

        Ranks write into `step_N.tmp`; once all have finished, rank 0 adds the marker and renames it into
        place, so an interrupted save never looks complete. Then the oldest beyond `keep` are deleted.
        """
        if step < 0:
            raise CheckpointError(f"step must be non-negative, got {step}")
        check_json(extra)
        final, tmp = self.path(step), self.path(step).with_name(f"step_{step:08d}.tmp")
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this step
            tmp.mkdir(parents=True)
        schedulers = gather_schedulers(trainer)
        omitted = left_out_records(self.hf_parts)
        state = trainer_state(trainer, tuple(r["prefix"] for r in omitted.values()))
        barrier()
        try:
            dcp.save(state, storage_writer=FileSystemWriter(tmp), no_dist=not distributed())
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise CheckpointError(f"saving step {step} into {tmp} failed {_why_not_saved(e, self.root)}; the "
                                  f"previous checkpoints are untouched") from e
        barrier()  # every rank has finished writing
        hashes = gathered_hashes(tmp)
        if rank() == 0:
            write_json(tmp / INFO, {"format": FORMAT_LEAVING_OUT if omitted else FORMAT, "step": step,
                                     "schedulers": schedulers, "extra": extra, HF_WEIGHTS: omitted})
            hashes = dict(sorted({**hashes, **file_hashes(tmp, [INFO])}.items()))
            write_json(tmp / MARKER, {"step": step, "files": file_sizes(tmp), HASH: hashes})
            move_into_place(tmp, final)
            fsync_dir(self.root)
            self._prune(step)
        barrier()
        return final

    def _prune(self, step: int) -> None:
        """Delete complete checkpoints beyond the newest `keep` up to `step` (the one just saved), and leftovers of
        interrupted saves. A checkpoint of a later step is one a resume skipped as damaged (resume takes the newest
        that verifies): it is set aside as `step_N.skipped`, never counted, loaded or deleted."""
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for later in [p for p in self.complete() if (checkpoint_step(p) or 0) > step]:
            aside = later.rename(later.with_name(f"{later.name}.skipped"))
            print(f"mimo train: set {later.name} aside as {aside.name} (a later step than this run's {step}: a "
                  f"resume skipped it as damaged); it is never loaded or deleted", flush=True)
        if self.keep is not None:
            for old in self.complete()[:-self.keep]:
                doomed = old.rename(old.with_name(f"{old.name}.tmp"))  # atomic: never a half-deleted "complete" one
                shutil.rmtree(doomed, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------------
    def load(self, path: str | Path, trainer: Trainer, verify: bool = True) -> dict:
        """Load a checkpoint into `trainer` whatever its layout (a collective); return the saved `extra`.
        `verify=False` where the whole checkpoint was just re-hashed (`mimo train`'s parent, before a resume).

        DCP reads every rank's parameters and optimizer state straight into its own shards (DTensor
        targets reshard; a DDP+TP shard is viewed as the DTensor it is), then the optimizers, schedulers,
        `trainer.step_count` (the saved step) and rank 0's RNG state (on every rank) are restored. Parts the
        checkpoint leaves out keep the weights the model was built with, from this run's `hf_parts`.
        """
        path = Path(path)
        metadata, info = open_checkpoint(path, verify)
        targets = model_targets(trainer.model, omitted_prefixes(path, info, self.hf_parts))
        agree_on_keys(path, metadata, targets, scheduler_problems(trainer, info))
        optim_targets = optimizer_targets(trainer, metadata)
        rng = torch.empty_like(torch.get_rng_state())
        state = {k: t for k, (t, _) in targets.items()}
        state.update({f"{OPTIMIZER}{key}.{name}": t for key, ts in optim_targets.items() for name, t in ts.items()})
        state[RNG] = rng
        _read(path, state)
        copy_into_shards(trainer, targets)
        restore_optimizers(trainer, optim_targets)
        restore_schedulers(trainer, info["schedulers"])
        trainer.step_count = info["step"]
        torch.set_rng_state(rng)
        return info["extra"]


def load_model_only(path: str | Path, model: nn.Module, hf_parts: Sequence[HFPart] = (), verify: bool = True) -> None:
    """Load a checkpoint's parameters into a whole, unwrapped `MimoModel` in this one process (no groups); the
    parts it leaves out must be `hf_parts` of the same directories, whose weights `model` already holds.
    `verify=False` where its hashes were just checked (or it was just written)."""
    path = Path(path)
    if any(sharding(p) is not None for p in model.parameters()):
        raise CheckpointError("load_model_only takes a whole, unwrapped model; use Checkpointer.load for a "
                              "distributed one")
    targets = _fitting_targets(path, model, hf_parts, verify)
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        _read(path, {k: t for k, (t, _) in targets.items()}, no_dist=True)


def check_weights_fit(path: str | Path, model: nn.Module, hf_parts: Sequence[HFPart] = ()) -> None:
    """`path` is a complete, intact checkpoint (every file's hash verified) whose parameters are exactly those
    of the whole, unwrapped `model` (names and shapes; a meta model will do) but the parts it leaves out, which
    come from the same Hugging Face directories as this run's `hf_parts`; or a one-line `CheckpointError` naming
    the difference."""
    _fitting_targets(Path(path), model, hf_parts, verify=True)


def _fitting_targets(path: Path, model: nn.Module, hf_parts: Sequence[HFPart], verify: bool) -> Targets:
    """`model_targets` of the parameters checkpoint `path` holds, once it is found to fit `model`."""
    metadata, info = open_checkpoint(path, verify)
    targets = model_targets(model, omitted_prefixes(path, info, hf_parts))
    problem = key_problems(metadata, {k: s for k, (_, s) in targets.items()})
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")
    return targets


def load_weights(path: str | Path, trainer: HasModel, hf_parts: Sequence[HFPart] = (), verify: bool = True) -> None:
    """Only a checkpoint's parameters, into `trainer`'s model on any layout (a collective): a pretrained
    checkpoint (`checkpoint.pretrained_checkpoint`, e.g. LLaVA stage 2 from stage 1). The optimizer state,
    the schedule, the step, the RNG and the data position start fresh, as a new run's do. Parts it leaves out
    keep the weights the model was built with, from the run's `hf_parts`. `verify=False` where the run's plan
    has just verified its hashes (`check_weights_fit`)."""
    path = Path(path)
    metadata, info = open_checkpoint(path, verify)
    targets = model_targets(trainer.model, omitted_prefixes(path, info, hf_parts))
    agree_on_keys(path, metadata, targets, [])
    _read(path, {k: t for k, (t, _) in targets.items()})
    copy_into_shards(trainer, targets)


def _read(path: Path, state: dict[str, torch.Tensor], no_dist: bool | None = None) -> None:
    """DCP's load of `state` from checkpoint `path` (opened and checked before), nothing unpickled but by the
    allow-lists (`SafeReader`, `SafePlanner`); a damaged record (a header, a tensor) is a one-line error."""
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(),
                 no_dist=not distributed() if no_dist is None else no_dist)
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        raise CheckpointError(f"checkpoint {path} could not be read {cause(e)}: it is corrupt") from None


def _why_not_saved(error: BaseException, root: Path) -> str:
    """Why a save failed, in one line: 'no space left on ROOT' for a full disk (torch's writer may report one
    as 'unexpected pos'; what is left free is checked too), else DCP's first failure."""
    free = _free_bytes(root)
    if errno.ENOSPC in _errnos(error) or (free is not None and free < LOW_SPACE):
        return f"(no space left on {root}: {'?' if free is None else free >> 20} MiB free)"
    return cause(error)


LOW_SPACE = 16 << 20  # bytes free below which a failed save is put down to a full disk


def _free_bytes(directory: Path) -> int | None:
    """Bytes free for us on `directory`'s file system (None if it cannot be told)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _errnos(error: BaseException) -> set[int]:
    """The errno of every OSError in `error`, its causes and contexts, and DCP's per-rank failures."""
    found, todo, seen = set(), [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            found.add(e.errno)
        failures = getattr(e, "failures", None) if isinstance(e, CheckpointException) else None
        todo += [e.__cause__, e.__context__, *(f for fs in (failures or {}).values() for f in _as_list(fs))]
    return found


def _as_list(failure: object) -> list[BaseException]:
    """DCP's failure per rank: an exception, or a (exception, traceback) pair."""
    if isinstance(failure, BaseException):
        return [failure]
    return [f for f in failure if isinstance(f, BaseException)] if isinstance(failure, tuple | list) else []


# -- opening and checking a checkpoint ---------------------------------------------------------------------
def open_checkpoint(path: Path, verify: bool = True) -> tuple[Metadata, dict]:
    """DCP's metadata and our JSON of a complete, intact checkpoint; a one-line `CheckpointError` otherwise.

    Every check is local and reads the same files on every rank, so all ranks agree without talking.
    `verify` also re-hashes every file (one read of the whole checkpoint): every reader does, but the workers of
    a resume or a pretrained start, whose parent did it once just before (they check sizes only). Whatever
    the metadata says, nothing is loaded unless every entry is a tensor read from one of the marker's files.
    """
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted")
    marker = read_json(path / MARKER)
    check_sizes(path, marker)
    if verify:
        verify_hashes(path, marker.get(HASH, {}))
    info = read_json(path / INFO)
    if info.get("format") not in (FORMAT, FORMAT_LEAVING_OUT):
        raise CheckpointError(f"checkpoint {path} has format {info.get('format')!r}; this mimo reads {FORMAT} or "
                              f"{FORMAT_LEAVING_OUT}")
    lacking = [k for k in ("step", "schedulers", "extra") if k not in info]
    if lacking:
        raise CheckpointError(f"checkpoint {path} has a corrupt {INFO}: no {', '.join(lacking)}")
    info.setdefault(HF_WEIGHTS, {})  # written before parts were left out: it holds every parameter
    check_hf_records(path, info[HF_WEIGHTS])
    check_step(path, marker, info)
    try:
        metadata = SafeReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - whatever DCP or the unpickler raises, the file is unusable
        raise CheckpointError(f"checkpoint {path} has corrupt DCP metadata ({DCP_METADATA}): "
                              f"{type(e).__name__}: {one_line(e)}") from None
    if RNG not in metadata.state_dict_metadata:
        raise CheckpointError(f"checkpoint {path} has no {RNG}: it was not written by mimo's Checkpointer")
    problem = storage_problem(metadata) or _foreign_files(path, metadata, marker)
    if problem:
        raise CheckpointError(f"checkpoint {path} was not written so by mimo ({problem}); refused before loading "
                              f"anything")
    return metadata, info


def _foreign_files(path: Path, metadata: Metadata, marker: dict) -> str:
    """'' if DCP reads only from the checkpoint's own files (those the marker lists, sized and hashed; a marker from
    before it listed them: those in the directory), plainly (mimo writes no transforms)."""
    own = marker["files"] if "files" in marker else [p.name for p in path.iterdir() if p.is_file()]
    listed = set(own) - {INFO, DCP_METADATA, MARKER}
    for name, transforms in storage_files(metadata).items():
        if name not in listed:
            return f"{DCP_METADATA} reads from {name[:100]!r}, which is not one of the checkpoint's data files"
        if transforms:
            return f"{DCP_METADATA} asks for transforms {', '.join(transforms)[:100]} of {name}; mimo writes none"
    return ""


def newest_intact(checkpointer: Checkpointer, report: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint that verifies (None if there is none). A newer one that fails is named
    through `report` and skipped; if none verifies, the newest one's error is raised."""
    complete = checkpointer.complete()
    failures: list[CheckpointError] = []
    for path in reversed(complete):
        try:
            open_checkpoint(path, verify=True)
        except CheckpointError as e:
            failures.append(e)
            continue
        for failure in failures:
            report(f"mimo train: skipping a damaged checkpoint: {failure}; resuming from {path} instead")
        return path
    if len(failures) > 1:
        raise CheckpointError(f"{failures[0]}; no earlier checkpoint verifies either")
    if failures:
        raise failures[0]
    return None


__all__ = ["HASH", "HF_WEIGHTS", "MARKER", "OPTIMIZER", "RNG", "Checkpointer", "CheckpointError", "HFPart", "Trainer",
           "check_weights_fit", "checkpoint_step", "file_hashes", "load_model_only", "load_weights", "newest_intact",
           "omitted_prefixes", "open_checkpoint", "parts_left_out", "weights_path"]
