"""Parameter initialization that does not depend on the parallel layout.

Every parameter's initial value is a function of `(seed, fully-qualified name)` only: a SHA-256 of the
two seeds a CPU `torch.Generator`, the full-size value is drawn in float32 and cast to the parameter's
dtype. So a pipeline stage, a tensor-parallel shard, a meta-device build and the single-process model
all start from the same numbers, which is what the parity tests rely on.

Rules, by owning module and name:
- weight of a norm (LayerNorm, RMSNorm, GroupNorm): ones;
- any parameter whose name ends in "bias": zeros;
- everything else (linear/conv/embedding weights, class token, position tables): normal(0, 0.02).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mimo.models.rmsnorm import RMSNorm

INIT_STD = 0.02
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, RMSNorm)
# Wrappers (activation checkpointing, torch.compile, FSDP1) that insert a level into parameter names;
# they are dropped from the seeding name so wrapping never changes the initial values.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


class ParameterSource(Protocol):
    """Stored values (e.g. a Hugging Face checkpoint) that take precedence over the seeded initial values."""

    def fill(self, name: str, param: torch.Tensor) -> bool:
        """Write this rank's part of parameter `name` into `param` (its local shard if a DTensor) and return
        True, or return False to leave it to the seeded initialization."""


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name): stable across processes, runs and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def canonical_name(name: str) -> str:
    """The name with wrapper levels (checkpointing, compile, FSDP1) removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def initial_value(seed: int, name: str, shape: torch.Size, owner: nn.Module) -> torch.Tensor:
    """The full float32 CPU value of parameter `name` (its last part picks the rule, `owner` its type)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias"):
        return torch.zeros(shape)
    if isinstance(owner, _NORMS):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.randn(shape, generator=generator) * INIT_STD


def init_parameters(
    module: nn.Module, seed: int, prefix: str = "", device: torch.device | str | None = None,
    source: ParameterSource | None = None,
) -> None:
    """Give every parameter of `module` its layout-independent value; materialize meta tensors first.

    `prefix` is prepended to every name for seeding, so a submodule initialized on its own matches the
    same submodule inside a larger model. DTensor parameters get this rank's shard of the full value
    (computed locally, no communication). Peak extra memory: one full parameter plus its shard.
    Shared weights broken by `to_empty` or TP wrapping are re-shared through each submodule's
    `tie_weights()`; non-persistent buffers are recomputed by each submodule's `reset_buffers()`.
    A `source` fills the parameters it holds first (by seeding name, aliases applied), each rank reading
    only its shard; the rest get their seeded values.
    """
    _materialize(module, device)
    _call_on_submodules(module, "tie_weights")
    with torch.no_grad():
        for name, param, owner in seeding_names(module, prefix):
            if source is not None and source.fill(name, param):
                continue
            _copy_full_value(param, initial_value(seed, name, param.shape, owner))
    reset_buffers(module)


def seeding_names(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """(seeding name, parameter, owning module) of each distinct parameter: the names a source is asked for."""
    aliases = _aliases(module)
    seen: set[int] = set()
    for owner_name, owner in module.named_modules():
        for leaf, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = canonical_name(f"{owner_name}.{leaf}" if owner_name else leaf)
            yield prefix + aliases.get(name, name), param, owner


def reset_buffers(module: nn.Module) -> None:
    """Call `reset_buffers()` on every submodule that defines it (rotary tables and the like)."""
    _call_on_submodules(module, "reset_buffers")


def _call_on_submodules(module: nn.Module, method: str) -> None:
    """Call `method()` on every submodule (the module included) that defines it."""
    for sub in module.modules():
        hook = getattr(sub, method, None)
        if callable(hook):
            hook()


def _materialize(module: nn.Module, device: torch.device | str | None) -> None:
    """`to_empty` the module if any parameter or buffer is on the meta device."""
    tensors = [*module.parameters(), *module.buffers()]
    if not any(t.is_meta for t in tensors):
        return
    if device is None:
        meshes = [p.device_mesh for p in tensors if isinstance(p, DTensor)]
        device = meshes[0].device_type if meshes else "cpu"
    module.to_empty(device=device)


def _aliases(module: nn.Module) -> dict[str, str]:
    """Fully-qualified seeding aliases gathered from every submodule's `init_aliases()`."""
    aliases: dict[str, str] = {}
    for sub_name, sub in module.named_modules():
        hook = getattr(sub, "init_aliases", None)
        if not callable(hook):
            continue
        base = canonical_name(sub_name)
        dot = f"{base}." if base else ""
        aliases.update({dot + src: dot + dst for src, dst in hook().items()})
    return aliases


def _copy_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write `full` into `param`; for a DTensor, only this rank's shard of it (sliced locally)."""
    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
