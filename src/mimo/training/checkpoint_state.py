"""What a checkpoint holds of a trainer, and how it goes back: parameters and optimizer state under layout-independent
keys (single-process names), each sharded one as a DTensor so that DCP reshards it; scheduler states; the RNG.

A DDP+TP local shard is seen as its DTensor (`mimo.ddp_shards.as_dtensor`, a view) for DCP and turned back after a
load. `Trainer` says what is read of a trainer; `MimoTrainer` is one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mimo.config import LANGUAGE
from mimo.ddp_shards import as_dtensor, as_local, copy_into_shard
from mimo.distributed import unwrap, wrapped_modules
from mimo.training.checkpoint_files import CheckpointError, check_json, distributed, rank

OPTIMIZER, RNG = "optimizer.", "rng_state"
Targets = dict[str, tuple[torch.Tensor, tuple[int, ...]]]  # key → (what DCP reads into, the global shape)


class Trainer(Protocol):
    """What a checkpoint saves of a trainer and restores into it: the (wrapped) model, each module's optimizer
    and learning-rate schedule, and the number of steps taken."""

    model: nn.Module
    optimizers: Mapping[str, Optimizer]
    schedulers: Mapping[str, LRScheduler]
    step_count: int


class HasModel(Protocol):
    """What loading weights alone needs of a trainer: its (wrapped) model."""

    model: nn.Module


def parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter, bool]]:
    """(module name, single-process key, parameter, aliased) for every parameter this rank hosts.

    An aliased parameter (a tied head on a later pipeline stage) takes the key of the one it is tied to.
    """
    for name, module in wrapped_modules(model).items():
        inner = unwrap(module)
        prefix = "language_model." if name == LANGUAGE else f"modality_submodules.{name}."
        aliases = getattr(inner, "init_aliases", dict)()
        for n, p in inner.named_parameters():
            yield name, prefix + aliases.get(n, n), p, n in aliases


# -- what a rank saves -------------------------------------------------------------------------------------
def trainer_state(trainer: Trainer, omitted: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """This rank's parameters and optimizer state under single-process keys, but those under the `omitted`
    prefixes (frozen parts read from Hugging Face directories); rank 0 adds its RNG state."""
    state: dict[str, torch.Tensor] = {RNG: torch.get_rng_state()} if rank() == 0 else {}
    for module, key, p, aliased in parameters(trainer.model):
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


def gather_schedulers(trainer: Trainer) -> dict[str, dict]:
    """Every module's scheduler state (the same on all its ranks), gathered on every rank."""
    local = {name: sched.state_dict() for name, sched in trainer.schedulers.items()}
    gathered = [local]
    if distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    merged: dict[str, dict] = {}
    for states in gathered:
        for name, state in states.items():
            merged.setdefault(name, state)
    check_json(merged, "scheduler state")
    return merged


# -- what a rank loads -------------------------------------------------------------------------------------
def model_targets(model: nn.Module, omitted: tuple[str, ...] = ()) -> Targets:
    """key → (the tensor DCP reads into, in place, and the parameter's global shape), but for keys under the
    `omitted` prefixes (parts a checkpoint leaves out: they keep the values the model was built with)."""
    targets = {}
    for _, key, p, _ in parameters(model):
        if key.startswith(omitted):
            continue
        target = as_dtensor(p.detach(), p)
        targets[key] = (target, tuple(target.shape))
    return targets


def copy_into_shards(trainer: HasModel, targets: Targets) -> None:
    """Copy each loaded DTensor into its DDP+TP local shard, where it is not already a view of it."""
    for _, key, p, _ in parameters(trainer.model):
        if key in targets:
            copy_into_shard(p, targets[key][0])


def optimizer_targets(trainer: Trainer, metadata: Metadata) -> dict[str, dict[str, torch.Tensor]]:
    """param key → {state name: empty tensor laid out like the parameter, or plain for a scalar} for every
    optimizer state the checkpoint holds for this rank's trainable parameters. A parameter with none
    saved (frozen then, or saved before the first step) starts with fresh state."""
    saved: dict[str, dict[str, TensorStorageMetadata]] = {}
    for k, meta in metadata.state_dict_metadata.items():
        if k.startswith(OPTIMIZER) and isinstance(meta, TensorStorageMetadata):
            key, name = k[len(OPTIMIZER):].rsplit(".", 1)
            saved.setdefault(key, {})[name] = meta
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for module, key, p, _ in parameters(trainer.model):
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


def restore_optimizers(trainer: Trainer, targets: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give each optimizer its loaded state (DDP+TP shards as local tensors) through `load_state_dict`."""
    key_of = {id(p): key for _, key, p, _ in parameters(trainer.model)}
    for opt in trainer.optimizers.values():
        state_dict = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        state_dict["state"] = {i: {name: as_local(v, p) for name, v in targets[key_of[id(p)]].items()}
                               for i, p in enumerate(params) if key_of[id(p)] in targets}
        opt.load_state_dict(state_dict)


def scheduler_problems(trainer: Trainer, info: dict) -> list[str]:
    """Saved schedulers whose number of parameter groups differs from this rank's optimizer."""
    out = []
    for name, sched in trainer.schedulers.items():
        saved = info["schedulers"].get(name)
        if saved is not None and len(saved["base_lrs"]) != len(sched.optimizer.param_groups):
            out.append(f"module '{name}' has {len(saved['base_lrs'])} optimizer parameter groups in the "
                       f"checkpoint, {len(sched.optimizer.param_groups)} here")
    return out


def restore_schedulers(trainer: Trainer, saved: dict[str, dict]) -> None:
    """Load each module's scheduler state and set its optimizer's learning rates to where it left off."""
    for name, sched in trainer.schedulers.items():
        if name not in saved:
            continue
        sched.load_state_dict(saved[name])
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr


# -- does it fit ---------------------------------------------------------------------------------------------
def agree_on_keys(path: Path, metadata: Metadata, targets: Targets, problems: list[str]) -> None:
    """Check the whole model's keys and shapes against the checkpoint; every rank raises the same error.

    Each rank knows only its own parameters, so ranks share their (key, shape) lists and local problems
    first (one small all-gather), then all judge the same union.
    """
    local = ({k: s for k, (_, s) in targets.items()}, problems)
    gathered = [local]
    if distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    shapes = {k: s for keys, _ in gathered for k, s in keys.items()}
    found = list(dict.fromkeys(p for _, ps in gathered for p in ps))
    key_problem = key_problems(metadata, shapes)
    problem = "; ".join(p for p in (key_problem, *found) if p)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")


def key_problems(metadata: Metadata, shapes: dict[str, tuple[int, ...]]) -> str:
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


def storage_problem(metadata: Metadata) -> str:
    """'' if every entry of DCP's metadata is stored as mimo writes every key (parameters, optimizer state, the RNG
    state): a tensor; else the first that is not. A bytes entry is one torch would unpickle: it never loads."""
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            return f"{key[:100]!r} is stored as {type(meta).__name__} where mimo writes a tensor"
    return ""


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
