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
                            allow-list unpickler (`SafeReader`), never a plain `pickle.load`
        mimo.json           format, step, scheduler states, the caller's `extra`, the parts left out (JSON)
        COMPLETE            written last, after every rank has finished: step, every file's size and its
                            SHA-256 hash (each rank hashes a share of the files it just wrote; the parent
                            re-hashes them all before a resume, on threads: one read of the checkpoint)
    root/step_00000006.tmp/ a save in progress, or one that was interrupted: never loaded

This module orders a save and a load; what it orders lives by concern: `checkpoint_files` (directories, the
marker's sizes and hashes, JSON, the safe reader), `checkpoint_state` (what is saved of a trainer and how it is
restored; `Trainer` says what a trainer must offer) and `hf_provenance` (the parts left out and where they come from).
"""

from __future__ import annotations

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
from mimo.training.checkpoint_files import (
    DCP_METADATA,
    HASH,
    INFO,
    MARKER,
    CheckpointError,
    SafeReader,
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
            raise CheckpointError(f"saving step {step} into {tmp} failed {cause(e)}; the previous checkpoints "
                                  f"are untouched") from e
        barrier()  # every rank has finished writing
        hashes = gathered_hashes(tmp)
        if rank() == 0:
            write_json(tmp / INFO, {"format": FORMAT_LEAVING_OUT if omitted else FORMAT, "step": step,
                                     "schedulers": schedulers, "extra": extra, HF_WEIGHTS: omitted})
            hashes = dict(sorted({**hashes, **file_hashes(tmp, [INFO])}.items()))
            write_json(tmp / MARKER, {"step": step, "files": file_sizes(tmp), HASH: hashes})
            move_into_place(tmp, final)
            fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest `keep`, and leftovers of interrupted saves."""
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep is not None:
            for old in self.complete()[:-self.keep]:
                doomed = old.rename(old.with_name(f"{old.name}.tmp"))  # atomic: never a half-deleted "complete" one
                shutil.rmtree(doomed, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------------
    def load(self, path: str | Path, trainer: Trainer) -> dict:
        """Load a checkpoint into `trainer` whatever its layout (a collective); return the saved `extra`.

        DCP reads every rank's parameters and optimizer state straight into its own shards (DTensor
        targets reshard; a DDP+TP shard is viewed as the DTensor it is), then the optimizers, schedulers,
        `trainer.step_count` (the saved step) and rank 0's RNG state (on every rank) are restored. Parts the
        checkpoint leaves out keep the weights the model was built with, from this run's `hf_parts`.
        """
        path = Path(path)
        metadata, info = open_checkpoint(path)
        targets = model_targets(trainer.model, omitted_prefixes(path, info, self.hf_parts))
        agree_on_keys(path, metadata, targets, scheduler_problems(trainer, info))
        optim_targets = optimizer_targets(trainer, metadata)
        rng = torch.empty_like(torch.get_rng_state())
        state = {k: t for k, (t, _) in targets.items()}
        state.update({f"{OPTIMIZER}{key}.{name}": t for key, ts in optim_targets.items() for name, t in ts.items()})
        state[RNG] = rng
        dcp.load(state, storage_reader=SafeReader(path), no_dist=not distributed())
        copy_into_shards(trainer, targets)
        restore_optimizers(trainer, optim_targets)
        restore_schedulers(trainer, info["schedulers"])
        trainer.step_count = info["step"]
        torch.set_rng_state(rng)
        return info["extra"]


def load_model_only(path: str | Path, model: nn.Module, hf_parts: Sequence[HFPart] = ()) -> None:
    """Load a checkpoint's parameters into a whole, unwrapped `MimoModel` in this one process (no groups); the
    parts it leaves out must be `hf_parts` of the same directories, whose weights `model` already holds."""
    path = Path(path)
    if any(sharding(p) is not None for p in model.parameters()):
        raise CheckpointError("load_model_only takes a whole, unwrapped model; use Checkpointer.load for a "
                              "distributed one")
    targets = _fitting_targets(path, model, hf_parts)
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({k: t for k, (t, _) in targets.items()}, storage_reader=SafeReader(path), no_dist=True)


def check_weights_fit(path: str | Path, model: nn.Module, hf_parts: Sequence[HFPart] = ()) -> None:
    """`path` is a complete, intact checkpoint whose parameters are exactly those of the whole, unwrapped
    `model` (names and shapes; a meta model will do) but the parts it leaves out, which come from the same
    Hugging Face directories as this run's `hf_parts`; or a one-line `CheckpointError` naming the difference."""
    _fitting_targets(Path(path), model, hf_parts)


def _fitting_targets(path: Path, model: nn.Module, hf_parts: Sequence[HFPart]) -> Targets:
    """`model_targets` of the parameters checkpoint `path` holds, once it is found to fit `model`."""
    metadata, info = open_checkpoint(path)
    targets = model_targets(model, omitted_prefixes(path, info, hf_parts))
    problem = key_problems(metadata, {k: s for k, (_, s) in targets.items()})
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")
    return targets


def load_weights(path: str | Path, trainer: HasModel, hf_parts: Sequence[HFPart] = ()) -> None:
    """Only a checkpoint's parameters, into `trainer`'s model on any layout (a collective): a pretrained
    checkpoint (`checkpoint.pretrained_checkpoint`, e.g. LLaVA stage 2 from stage 1). The optimizer state,
    the schedule, the step, the RNG and the data position start fresh, as a new run's do. Parts it leaves out
    keep the weights the model was built with, from the run's `hf_parts`."""
    path = Path(path)
    metadata, info = open_checkpoint(path)
    targets = model_targets(trainer.model, omitted_prefixes(path, info, hf_parts))
    agree_on_keys(path, metadata, targets, [])
    dcp.load({k: t for k, (t, _) in targets.items()}, storage_reader=SafeReader(path), no_dist=not distributed())
    copy_into_shards(trainer, targets)


# -- opening and checking a checkpoint ---------------------------------------------------------------------
def open_checkpoint(path: Path, verify: bool = False) -> tuple[Metadata, dict]:
    """DCP's metadata and our JSON of a complete, intact checkpoint; a one-line `CheckpointError` otherwise.

    Every check is local and reads the same files on every rank, so all ranks agree without talking.
    `verify` also re-hashes every file (one read of the whole checkpoint): the parent does it once before a
    resume; the workers then check sizes only.
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
    return metadata, info


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
