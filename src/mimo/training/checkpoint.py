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
                            allow-list unpickler (`_SafeReader`), never a plain `pickle.load`
        mimo.json           format, step, scheduler states, the caller's `extra`, the parts left out (JSON)
        COMPLETE            written last, after every rank has finished: step, every file's size and its
                            SHA-256 hash (each rank hashes a share of the files it just wrote; the parent
                            re-hashes them all before a resume, on threads: one read of the checkpoint)
    root/step_00000006.tmp/ a save in progress, or one that was interrupted: never loaded
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from mimo.config import LANGUAGE
from mimo.ddp_shards import as_dtensor, as_local, copy_into_shard, sharding
from mimo.distributed import unwrap, wrapped_modules

# mimo.json's format: 2 for a checkpoint that leaves parts out (`weights_from_hf`), so that a mimo from before
# reads "has format 2; this mimo reads 1" rather than missing keys; 1 for one that holds every parameter
FORMAT, FORMAT_LEAVING_OUT = 1, 2
MARKER, INFO, DCP_METADATA = "COMPLETE", "mimo.json", ".metadata"
HASH = "sha256"  # the marker's key for {file: hex digest}; a checkpoint written before hashes has none
_CHUNK = 1 << 22
OPTIMIZER, RNG = "optimizer.", "rng_state"
HF_WEIGHTS = "weights_from_hf"  # mimo.json's key for the parts left out: {name: where their weights come from}
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, or that does not fit the model."""


@dataclass(frozen=True)
class HFPart:
    """A part of a run's model whose weights the run reads from a Hugging Face directory (`run_config.hf_parts`).

    `name`: vision_encoder, projector or language_model; `prefix`: its parameters' keys; `setting`: the config key
    naming `directory`; `fingerprint`: `mimo.hf.load.fingerprint` of it; `omitted`: the run's checkpoints leave
    it out (it is frozen and `checkpoint.save_frozen_hf_weights` is false).
    """

    name: str
    prefix: str
    setting: str
    directory: str
    fingerprint: dict[str, Any]
    omitted: bool

    def record(self) -> dict[str, Any]:
        """What a checkpoint that leaves this part out says about it in `mimo.json`."""
        return {"prefix": self.prefix, "setting": self.setting, "directory": self.directory,
                "fingerprint": self.fingerprint}


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
        if not self.root.is_dir():
            return []
        found = [(step, p) for p in self.root.iterdir() if (step := checkpoint_step(p)) is not None]
        return [p for _, p in sorted(found) if (p / MARKER).is_file()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint; partial and temporary directories are ignored."""
        done = self.complete()
        return done[-1] if done else None

    # -- save ------------------------------------------------------------------------------------------
    def save(self, step: int, trainer, extra: dict) -> Path:
        """Write step `step` of `trainer` (a collective: every rank calls it, stub ranks too); return its path.

        Ranks write into `step_N.tmp`; once all have finished, rank 0 adds the marker and renames it into
        place, so an interrupted save never looks complete. Then the oldest beyond `keep` are deleted.
        """
        if step < 0:
            raise CheckpointError(f"step must be non-negative, got {step}")
        _check_json(extra)
        final, tmp = self.path(step), self.path(step).with_name(f"step_{step:08d}.tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this step
            tmp.mkdir(parents=True)
        schedulers = _gather_schedulers(trainer)
        omitted = {p.name: p.record() for p in self.hf_parts if p.omitted}
        state = _trainer_state(trainer, tuple(r["prefix"] for r in omitted.values()))
        _barrier()
        try:
            dcp.save(state, storage_writer=FileSystemWriter(tmp), no_dist=not _distributed())
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise CheckpointError(f"saving step {step} into {tmp} failed {_cause(e)}; the previous checkpoints "
                                  f"are untouched") from e
        _barrier()  # every rank has finished writing
        hashes = _gathered_hashes(tmp)
        if _rank() == 0:
            _write_json(tmp / INFO, {"format": FORMAT_LEAVING_OUT if omitted else FORMAT, "step": step,
                                     "schedulers": schedulers, "extra": extra, HF_WEIGHTS: omitted})
            hashes = dict(sorted({**hashes, **file_hashes(tmp, [INFO])}.items()))
            _write_json(tmp / MARKER, {"step": step, "files": _file_sizes(tmp), HASH: hashes})
            _move_into_place(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
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
    def load(self, path: str | Path, trainer) -> dict:
        """Load a checkpoint into `trainer` whatever its layout (a collective); return the saved `extra`.

        DCP reads every rank's parameters and optimizer state straight into its own shards (DTensor
        targets reshard; a DDP+TP shard is viewed as the DTensor it is), then the optimizers, schedulers,
        `trainer.step_count` (the saved step) and rank 0's RNG state (on every rank) are restored. Parts the
        checkpoint leaves out keep the weights the model was built with, from this run's `hf_parts`.
        """
        path = Path(path)
        metadata, info = open_checkpoint(path)
        model_targets = _model_targets(trainer.model, omitted_prefixes(path, info, self.hf_parts))
        problems = _scheduler_problems(trainer, info)
        _agree_on_keys(path, metadata, model_targets, problems)
        optim_targets = _optimizer_targets(trainer, metadata)
        rng = torch.empty_like(torch.get_rng_state())
        state = {k: t for k, (t, _) in model_targets.items()}
        state.update({f"{OPTIMIZER}{key}.{name}": t for key, ts in optim_targets.items() for name, t in ts.items()})
        state[RNG] = rng
        dcp.load(state, storage_reader=_SafeReader(path), no_dist=not _distributed())
        _copy_into_shards(trainer, model_targets)
        _restore_optimizers(trainer, optim_targets)
        _restore_schedulers(trainer, info["schedulers"])
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
        dcp.load({k: t for k, (t, _) in targets.items()}, storage_reader=_SafeReader(path), no_dist=True)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name says (`step_00000004`: 4), None for any other name."""
    named = _STEP_DIR.match(path.name)
    return int(named[1]) if named else None


def weights_path(path: str | Path) -> Path:
    """Where a pretrained checkpoint's weights are: `path` if it is a checkpoint, else the newest complete
    checkpoint of the run directory (`path/checkpoints`) or checkpoints directory it names, else `path` (and
    `open_checkpoint` then says what is wrong)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = Checkpointer(root).latest()
        if latest is not None:
            return latest
    return path


def check_weights_fit(path: str | Path, model: nn.Module, hf_parts: Sequence[HFPart] = ()) -> None:
    """`path` is a complete, intact checkpoint whose parameters are exactly those of the whole, unwrapped
    `model` (names and shapes; a meta model will do) but the parts it leaves out, which come from the same
    Hugging Face directories as this run's `hf_parts`; or a one-line `CheckpointError` naming the difference."""
    _fitting_targets(Path(path), model, hf_parts)


def _fitting_targets(path: Path, model: nn.Module, hf_parts: Sequence[HFPart]) -> dict:
    """`_model_targets` of the parameters checkpoint `path` holds, once it is found to fit `model`."""
    metadata, info = open_checkpoint(path)
    targets = _model_targets(model, omitted_prefixes(path, info, hf_parts))
    problem = _key_problems(metadata, {k: s for k, (_, s) in targets.items()})
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")
    return targets


def load_weights(path: str | Path, trainer, hf_parts: Sequence[HFPart] = ()) -> None:
    """Only a checkpoint's parameters, into `trainer`'s model on any layout (a collective): a pretrained
    checkpoint (`checkpoint.pretrained_checkpoint`, e.g. LLaVA stage 2 from stage 1). The optimizer state,
    the schedule, the step, the RNG and the data position start fresh, as a new run's do. Parts it leaves out
    keep the weights the model was built with, from the run's `hf_parts`."""
    path = Path(path)
    metadata, info = open_checkpoint(path)
    targets = _model_targets(trainer.model, omitted_prefixes(path, info, hf_parts))
    _agree_on_keys(path, metadata, targets, [])
    dcp.load({k: t for k, (t, _) in targets.items()}, storage_reader=_SafeReader(path), no_dist=not _distributed())
    _copy_into_shards(trainer, targets)


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
    marker = _read_json(path / MARKER)
    for name, size in marker.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes instead of {size}"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {name} is {state}")
    if verify:
        _verify_hashes(path, marker.get(HASH, {}))
    info = _read_json(path / INFO)
    if info.get("format") not in (FORMAT, FORMAT_LEAVING_OUT):
        raise CheckpointError(f"checkpoint {path} has format {info.get('format')!r}; this mimo reads {FORMAT} or "
                              f"{FORMAT_LEAVING_OUT}")
    lacking = [k for k in ("step", "schedulers", "extra") if k not in info]
    if lacking:
        raise CheckpointError(f"checkpoint {path} has a corrupt {INFO}: no {', '.join(lacking)}")
    info.setdefault(HF_WEIGHTS, {})  # written before parts were left out: it holds every parameter
    _check_hf_records(path, info[HF_WEIGHTS])
    _check_step(path, marker, info)
    try:
        metadata = _SafeReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - whatever DCP or the unpickler raises, the file is unusable
        raise CheckpointError(f"checkpoint {path} has corrupt DCP metadata ({DCP_METADATA}): "
                              f"{type(e).__name__}: {_one_line(e)}") from None
    if RNG not in metadata.state_dict_metadata:
        raise CheckpointError(f"checkpoint {path} has no {RNG}: it was not written by mimo's Checkpointer")
    return metadata, info


def _check_hf_records(path: Path, records: Any) -> None:
    """Each part left out is recorded with its key prefix, setting, directory and fingerprint."""
    fields = ("prefix", "setting", "directory", "fingerprint")
    if not isinstance(records, dict) or not all(isinstance(r, dict) and all(f in r for f in fields)
                                                for r in records.values()):
        raise CheckpointError(f"checkpoint {path} has a corrupt {INFO}: {HF_WEIGHTS} must map each part left out "
                              f"to its {', '.join(fields)}")


def parts_left_out(path: str | Path) -> set[str]:
    """The parts a checkpoint (or a run directory: its newest) leaves out, by name, from its `mimo.json` alone;
    none if it cannot be read (whatever loads it refuses it then, naming why)."""
    try:
        return set(_read_json(weights_path(path) / INFO).get(HF_WEIGHTS, {}))
    except CheckpointError:
        return set()


def omitted_prefixes(path: Path, info: dict, hf_parts: Sequence[HFPart]) -> tuple[str, ...]:
    """The key prefixes of the parts checkpoint `path` (its `info`) leaves out, each checked to come from a
    Hugging Face directory of this run (`hf_parts`) with the fingerprint recorded; else a one-line
    `CheckpointError` naming the part, the directory recorded, the one configured and what to do."""
    from mimo.hf.load import fingerprint_difference

    ours = {p.name: p for p in hf_parts}
    for name, recorded in info[HF_WEIGHTS].items():
        part, was = ours.get(name), recorded["directory"]
        if part is None:
            raise CheckpointError(f"checkpoint {path} leaves out the frozen {name}, whose weights come from the "
                                  f"Hugging Face directory {was} ({recorded['setting']}), but this run reads "
                                  f"{name} from no Hugging Face directory: set {recorded['setting']} to {was} "
                                  f"(or to a copy of it)")
        difference = ("it does not exist" if not Path(part.directory).is_dir() else
                      fingerprint_difference(recorded["fingerprint"], part.fingerprint))
        if difference:
            raise CheckpointError(f"checkpoint {path} leaves out the frozen {name}, whose weights come from the "
                                  f"Hugging Face directory {was}, but this run's {part.setting} {part.directory} "
                                  f"is not that directory ({difference}): set {recorded['setting']} to {was} or "
                                  f"to an unchanged copy of it (--set {recorded['setting']}=PATH)")
    return tuple(recorded["prefix"] for recorded in info[HF_WEIGHTS].values())


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


def _verify_hashes(path: Path, expected: dict[str, str]) -> None:
    """Every file hashed in the marker has that hash still (files are hashed in parallel threads)."""
    actual = file_hashes(path, sorted(expected))
    for name, digest in expected.items():
        if actual[name] != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its {HASH} hash in "
                                  f"{MARKER} (changed or replaced after the save)")


def _check_step(path: Path, marker: dict, info: dict) -> None:
    """The step in the directory name, the marker and `mimo.json` agree."""
    named = _STEP_DIR.match(path.name)
    steps = {"the directory name": int(named[1]) if named else info["step"], MARKER: marker.get("step"),
             INFO: info["step"]}
    if len(set(steps.values())) > 1:
        said = ", ".join(f"{v!r} in {k}" for k, v in steps.items())
        raise CheckpointError(f"checkpoint {path} disagrees about its step ({said}): it was edited or moved")


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


def _gathered_hashes(directory: Path) -> dict[str, str]:
    """The hashes of every file in `directory` (DCP's files), each rank hashing its share; on every rank."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    local = file_hashes(directory, names[rank::world])
    gathered = [local]
    if _distributed():
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    return dict(sorted((name, digest) for part in gathered for name, digest in part.items()))


def _agree_on_keys(path: Path, metadata: Metadata, targets: dict, problems: list[str]) -> None:
    """Check the whole model's keys and shapes against the checkpoint; every rank raises the same error.

    Each rank knows only its own parameters, so ranks share their (key, shape) lists and local problems
    first (one small all-gather), then all judge the same union.
    """
    local = ({k: s for k, (_, s) in targets.items()}, problems)
    gathered = [local]
    if _distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    shapes = {k: s for keys, _ in gathered for k, s in keys.items()}
    found = list(dict.fromkeys(p for _, ps in gathered for p in ps))
    key_problem = _key_problems(metadata, shapes)
    problem = "; ".join(p for p in (key_problem, *found) if p)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")


def _key_problems(metadata: Metadata, shapes: dict[str, tuple[int, ...]]) -> str:
    """Missing keys, unexpected keys and shape mismatches between the model and the checkpoint ('' if none)."""
    saved = {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith(OPTIMIZER) and k != RNG}
    missing = sorted(set(shapes) - set(saved))
    unexpected = sorted(set(saved) - set(shapes))
    mismatched = [f"{k} {saved[k]} in the checkpoint vs {shapes[k]} here" for k in sorted(set(saved) & set(shapes))
                  if saved[k] != tuple(shapes[k])]
    parts = [f"{what} {_first(keys)}" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
    return "; ".join(parts)


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


class _SafeReader(FileSystemReader):
    """DCP's filesystem reader, but its pickled `.metadata` is read with an allow-list unpickler.

    DCP stores its metadata as a pickle; a plain `pickle.load` of a tampered file could run anything. Only
    DCP's metadata classes, `torch.Size`, dtypes, layouts and paths may be built. (We put tensors only
    into DCP, so no pickled `BYTE_IO` items, which DCP would `torch.load(weights_only=False)`, exist.)
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Unpickle `.metadata` with the allow-list; set the load id as DCP's own reader does."""
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        metadata = _AllowListUnpickler(io.BytesIO(Path(self.path, name).read_bytes())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"expected DCP Metadata, found {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _AllowListUnpickler(pickle.Unpickler):
    """Builds only what DCP metadata is made of; refuses every other global."""

    _CLASSES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        """Allow DCP metadata classes, torch dtypes and the few helpers above."""
        allowed = (module, name) in self._CLASSES
        if module == dcp_metadata.__name__:
            cls = getattr(dcp_metadata, name, None)
            allowed = isinstance(cls, type) and cls.__module__ == module
        elif module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


# -- what a rank saves ---------------------------------------------------------------------------------
def _parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter, bool]]:
    """(module name, single-process key, parameter, aliased) for every parameter this rank hosts.

    An aliased parameter (a tied head on a later pipeline stage) takes the key of the one it is tied to.
    """
    for name, module in wrapped_modules(model).items():
        inner = unwrap(module)
        prefix = "language_model." if name == LANGUAGE else f"modality_submodules.{name}."
        aliases = getattr(inner, "init_aliases", dict)()
        for n, p in inner.named_parameters():
            yield name, prefix + aliases.get(n, n), p, n in aliases


def _trainer_state(trainer, omitted: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """This rank's parameters and optimizer state under single-process keys, but those under the `omitted`
    prefixes (frozen parts read from Hugging Face directories); rank 0 adds its RNG state."""
    state: dict[str, torch.Tensor] = {RNG: torch.get_rng_state()} if _rank() == 0 else {}
    for module, key, p, aliased in _parameters(trainer.model):
        if aliased or key.startswith(omitted):
            continue
        state[key] = as_dtensor(p.detach(), p)
        opt = trainer.optimizers.get(module)
        for name, value in (opt.state.get(p, {}) if opt is not None else {}).items():
            if not torch.is_tensor(value):
                raise CheckpointError(f"optimizer state {name!r} of {key} is a {type(value).__name__}; only "
                                      f"tensor state can be checkpointed")
            state[f"{OPTIMIZER}{key}.{name}"] = as_dtensor(value, p)
    return state


# -- what a rank loads ---------------------------------------------------------------------------------
def _model_targets(model: nn.Module, omitted: tuple[str, ...] = ()) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """key → (the tensor DCP reads into, in place, and the parameter's global shape), but for keys under the
    `omitted` prefixes (parts a checkpoint leaves out: they keep the values the model was built with)."""
    targets = {}
    for _, key, p, _ in _parameters(model):
        if key.startswith(omitted):
            continue
        target = as_dtensor(p.detach(), p)
        targets[key] = (target, tuple(target.shape))
    return targets


def _copy_into_shards(trainer, targets: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Copy each loaded DTensor into its DDP+TP local shard, where it is not already a view of it."""
    for _, key, p, _ in _parameters(trainer.model):
        if key in targets:
            copy_into_shard(p, targets[key][0])


def _optimizer_targets(trainer, metadata: Metadata) -> dict[str, dict[str, torch.Tensor]]:
    """param key → {state name: empty tensor laid out like the parameter, or plain for a scalar} for every
    optimizer state the checkpoint holds for this rank's trainable parameters. A parameter with none
    saved (frozen then, or saved before the first step) starts with fresh state."""
    saved: dict[str, dict[str, TensorStorageMetadata]] = {}
    for k, meta in metadata.state_dict_metadata.items():
        if k.startswith(OPTIMIZER) and isinstance(meta, TensorStorageMetadata):
            key, name = k[len(OPTIMIZER):].rsplit(".", 1)
            saved.setdefault(key, {})[name] = meta
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for module, key, p, _ in _parameters(trainer.model):
        if module not in trainer.optimizers or not p.requires_grad or key not in saved:
            continue
        like = as_dtensor(p.detach(), p)
        targets[key] = {name: _empty(meta, like) for name, meta in saved[key].items()}
    return targets


def _empty(meta: TensorStorageMetadata, like: torch.Tensor) -> torch.Tensor:
    """A target for one saved state: laid out like the parameter if it has its shape (moments), else plain."""
    dtype = meta.properties.dtype
    return torch.empty_like(like, dtype=dtype) if tuple(meta.size) == tuple(like.shape) else \
        torch.empty(meta.size, dtype=dtype)


def _restore_optimizers(trainer, targets: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give each optimizer its loaded state (DDP+TP shards as local tensors) through `load_state_dict`."""
    key_of = {id(p): key for _, key, p, _ in _parameters(trainer.model)}
    for opt in trainer.optimizers.values():
        state_dict = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        state_dict["state"] = {i: {name: as_local(v, p) for name, v in targets[key_of[id(p)]].items()}
                               for i, p in enumerate(params) if key_of[id(p)] in targets}
        opt.load_state_dict(state_dict)


def _scheduler_problems(trainer, info: dict) -> list[str]:
    """Saved schedulers whose number of parameter groups differs from this rank's optimizer."""
    out = []
    for name, sched in trainer.schedulers.items():
        saved = info["schedulers"].get(name)
        if saved is not None and len(saved["base_lrs"]) != len(sched.optimizer.param_groups):
            out.append(f"module '{name}' has {len(saved['base_lrs'])} optimizer parameter groups in the "
                       f"checkpoint, {len(sched.optimizer.param_groups)} here")
    return out


def _restore_schedulers(trainer, saved: dict[str, dict]) -> None:
    """Load each module's scheduler state and set its optimizer's learning rates to where it left off."""
    for name, sched in trainer.schedulers.items():
        if name not in saved:
            continue
        sched.load_state_dict(saved[name])
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr


def _gather_schedulers(trainer) -> dict[str, dict]:
    """Every module's scheduler state (the same on all its ranks), gathered on every rank."""
    local = {name: sched.state_dict() for name, sched in trainer.schedulers.items()}
    gathered = [local]
    if _distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    merged: dict[str, dict] = {}
    for states in gathered:
        for name, state in states.items():
            merged.setdefault(name, state)
    _check_json(merged, "scheduler state")
    return merged


# -- files and ranks ---------------------------------------------------------------------------------------
def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory to its final name, replacing an older save of the same step."""
    if final.exists():
        aside = final.with_name(final.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(final)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(directory: Path) -> dict[str, int]:
    """Every file's size, so a truncated one is caught before loading."""
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}


def _write_json(path: Path, data: dict) -> None:
    """Write JSON durably: a temporary file, fsync, then rename."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path.parent} has a corrupt {path.name}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path.parent} has a corrupt {path.name}: not a JSON object")
    return data


def _check_json(data: Any, what: str = "extra") -> None:
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must be JSON-serializable (it is stored as JSON, never pickled): {e}") from None


def _cause(e: BaseException) -> str:
    """'on rank(s) R (Type: message)' for DCP's gathered failure, '(Type: message)' for any other."""
    if isinstance(e, CheckpointException) and e.failures:
        first = e.failures[min(e.failures)][0]
        return f"on rank(s) {sorted(e.failures)} ({type(first).__name__}: {_one_line(first)})"
    return f"({type(e).__name__}: {_one_line(e)})"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


__all__ = ["Checkpointer", "CheckpointError", "HFPart", "check_weights_fit", "checkpoint_step", "file_hashes",
           "load_model_only", "load_weights", "newest_intact", "omitted_prefixes", "open_checkpoint",
           "parts_left_out", "weights_path"]
