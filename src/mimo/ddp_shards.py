"""DDP over tensor-parallel shards: a TP module's DTensor parameters held as plain local shards, and the one place
on mimo's data-parallel and checkpoint path that uses torch's private API.

Why it exists. torch's DDP cannot hold DTensor parameters (its reducer buckets plain tensors), yet DDP is what gives
a TP module gradients all-reduced in buckets that overlap the backward. So `localize` registers each DTensor
parameter's local shard as a plain `Parameter` (its `Sharding` attached) and makes the shards DTensors again only
around the module's forward (torch's `_pre_dp_module_transform` idea, fixed for nested modules). The public
alternative is FSDP2 over the dp mesh dim with `reshard_after_forward: never` (gathered once a step, as DDP's replicas
are), which holds DTensors natively and would let the checkpoint use DCP's `get_/set_model_state_dict`; it has not
been measured against this path (TP2 x DP2 needs four GPUs: benchmarks/RESULTS.md, Next), so it stays, confined here.

Private torch used here and nowhere else on that path (`tests/test_ddp_shards.py` fails, naming what moved, on a
torch whose internals changed):
- `torch.distributed.tensor._api._FromTorchTensor`, `DTensor.from_local`'s autograd function: `_ShardView`
  subclasses it and calls it positionally, forward(ctx, local, mesh, placements, run_check, shape, stride) and
  backward(ctx, grad)[0], so that a replicated parameter's partial gradient can come back unreduced.
- `DistributedDataParallel.reducer.prepare_for_backward`: arms DDP's reducer for a backward whose forward ran under
  `no_sync` (`arm_reducer`; torch's own pipelining schedule does the same).
- `Tensor._base`, whether a tensor is a view (`not_a_view`, FSDP2's path: FSDP2 warns on every view a wrapped module
  returns, by the same test).

Everything else is public torch. Callers read a parameter's `sharding`, `local_tensor` and `full_tensor` alike for a
DTensor (FSDP2, TP alone) and a DDP local shard; checkpoints see a shard as its DTensor (`as_dtensor`, `as_local`,
`copy_into_shard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate
from torch.distributed.tensor._api import _FromTorchTensor
from torch.nn.parallel import DistributedDataParallel

_SHARDING = "_mimo_sharding"  # a local shard's `Sharding`
_PARTIAL_DIMS = "_mimo_partial_dims"  # mesh dims over which a local shard's gradient is still a partial sum


@dataclass(frozen=True)
class Sharding:
    """How a parameter lies over its mesh, in public terms: what its DTensor (or the DTensor of a local shard) says."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def sharding(param: torch.Tensor) -> Sharding | None:
    """A DTensor's sharding, or the one a DDP local shard carries; None for a plain parameter."""
    if isinstance(param, DTensor):
        return Sharding(param.device_mesh, tuple(param.placements), param.shape, param.stride())
    return getattr(param, _SHARDING, None)


def is_local_shard(param: torch.Tensor) -> bool:
    """Whether `param` is a DDP local shard (a plain tensor standing for a DTensor)."""
    return hasattr(param, _SHARDING)


# -- a TP module under DDP ---------------------------------------------------------------------------------
LocalShard = tuple[nn.Module, str, nn.Parameter]  # owner, attribute, the local shard


def localize(module: nn.Module) -> None:
    """Let DDP see a TP module's local shards as its parameters; DTensors exist only inside forward.

    The same local `Parameter` objects stay registered between forwards, so the optimizer, DDP's reducer and
    `full_tensor` agree. A replicated shard whose gradient comes back partial over TP (a sequence-parallel norm's
    weight) keeps it unreduced through every micro-batch (DDP sums it over DP) and `sum_partial_grads` sums it over
    TP once per step (`_ShardView`).
    """
    shards: list[LocalShard] = []
    # one local shard per DTensor (kept alive beside it, so ids stay unique): a tied weight stays one parameter
    locals_of: dict[int, tuple[DTensor, nn.Parameter]] = {}
    for owner in module.modules():
        for attr, param in list(owner.named_parameters(recurse=False, remove_duplicate=False)):
            if isinstance(param, DTensor):
                if id(param) not in locals_of:
                    local = nn.Parameter(param.to_local(), requires_grad=param.requires_grad)
                    setattr(local, _SHARDING, sharding(param))
                    locals_of[id(param)] = (param, local)
                local = locals_of[id(param)][1]
                setattr(owner, attr, local)  # in place: the registration order is kept
                shards.append((owner, attr, local))
    module.register_forward_pre_hook(lambda *_: _as_dtensors(shards))
    module.register_forward_hook(lambda *_: _as_locals(shards))


def _as_dtensors(shards: list[LocalShard]) -> None:
    """Each local shard's DTensor view in its owner's attribute (the forward's parameters)."""
    for owner, attr, local in shards:
        delattr(owner, attr)
        setattr(owner, attr, _ShardView.apply(local, getattr(local, _SHARDING)))  # a plain attribute, not a parameter


def _as_locals(shards: list[LocalShard]) -> None:
    """The local shards registered again (what DDP and the optimizer hold)."""
    for owner, attr, local in shards:
        delattr(owner, attr)
        owner.register_parameter(attr, local)


@contextlib.contextmanager
def dtensor_params(module: nn.Module) -> Iterator[None]:
    """Inside, a DDP+TP module's local shards are their DTensors again, as in its forward; a no-op inside the
    forward itself. A recomputed block runs its forward again during the backward, outside the hooks."""
    shards = [(owner, attr, p) for owner in module.modules()
              for attr, p in owner.named_parameters(recurse=False, remove_duplicate=False) if is_local_shard(p)]
    _as_dtensors(shards)
    try:
        yield
    finally:
        _as_locals(shards)


class _ShardView(_FromTorchTensor):
    """`DTensor.from_local(shard, ...)` with torch's own forward and backward, but for one case: a gradient partial
    (a sum) over a mesh dim where the parameter is replicated comes back to the shard unreduced, the shard marked for
    `sum_partial_grads` to sum it there once per step, not in every micro-batch's backward (torch all-reduces each:
    every norm weight and bias, in every micro-batch)."""

    @staticmethod
    def forward(ctx, local: nn.Parameter, spec: Sharding) -> DTensor:  # type: ignore[override]
        # the placements kept here, not read from torch's own ctx fields: their names differ between versions
        # (`previous_placement` before, `forward_input_placements` in 2.13); torch's backward reads its own
        ctx.local, ctx.placements = local, spec.placements
        return _FromTorchTensor.forward(ctx, local, spec.mesh, spec.placements, False, spec.shape, spec.stride)

    @staticmethod
    def backward(ctx, grad: DTensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        dims = () if grad is None else partial_over_replicate(grad.placements, ctx.placements)
        if not dims:
            return _FromTorchTensor.backward(ctx, grad)[0], None
        setattr(ctx.local, _PARTIAL_DIMS, dims)
        return grad.to_local(), None  # no grad mode in a backward: the local tensor itself


def partial_over_replicate(grad: tuple[Placement, ...], param: tuple[Placement, ...]) -> tuple[int, ...]:
    """The mesh dims where a gradient is a partial sum of a replicated parameter's, if it differs from the
    parameter's placements in those alone; else () (torch's `from_local` backward redistributes it)."""
    dims = tuple(i for i, (g, p) in enumerate(zip(grad, param, strict=True))
                 if isinstance(g, Partial) and g.reduce_op == "sum" and isinstance(p, Replicate))
    alike = all(g == p for i, (g, p) in enumerate(zip(grad, param, strict=True)) if i not in dims)
    return dims if alike else ()


def sum_partial_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients DDP+TP shards hold partial (`_ShardView`) over those mesh dims' groups, in place: one flat
    all-reduce per group and dtype. Every rank of a group marks the same shards, in the same order."""
    pending: dict[tuple[dist.ProcessGroup, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        dims = p.__dict__.pop(_PARTIAL_DIMS, ())  # read and cleared: the next step marks afresh
        if p.grad is None:
            continue
        for dim in dims:
            pending.setdefault((getattr(p, _SHARDING).mesh.get_group(dim), p.grad.dtype), []).append(p.grad)
    for (group, _), grads in pending.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(piece.view_as(g))


def arm_reducer(ddp: DistributedDataParallel) -> None:
    """Arm DDP's reducer for the coming backward, as DDP's own forward does outside `no_sync`: its forwards ran
    under `no_sync` (`no_sync_forward`), and only the last backward to reach a module reduces. DDP passes the
    reducer its outputs only with `find_unused_parameters`, which mimo never sets; so none here."""
    ddp.reducer.prepare_for_backward([])


# -- a parameter's values, whatever holds them -------------------------------------------------------------
def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor: a DTensor's local shard; a plain (or DDP+TP local) tensor as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def as_dtensor(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (laid out like `param`) as DTensor-aware code must see it: a DDP local shard's value becomes its
    DTensor (a view, no copy); anything else as is."""
    spec = getattr(param, _SHARDING, None)
    if spec is None or isinstance(tensor, DTensor) or tensor.shape != param.shape:
        return tensor
    return DTensor.from_local(tensor, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride)


def as_local(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A DTensor back to its local shard where the parameter is a DDP local shard; anything else as is."""
    return value.to_local() if isinstance(value, DTensor) and not isinstance(param, DTensor) else value


def copy_into_shard(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a loaded DTensor into a DDP local shard, unless it is a view of it already (`as_dtensor`'s)."""
    if isinstance(value, DTensor) and not isinstance(param, DTensor):
        local = value.to_local()
        if local.data_ptr() != param.data_ptr():
            with torch.no_grad():
                param.copy_(local)


def full_tensor(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole value of `tensor` (a parameter or its gradient, laid out like `param`); a collective on the
    parameter's mesh when it is sharded."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    spec = getattr(param, _SHARDING, None)
    if spec is None:
        return tensor
    return DTensor.from_local(tensor, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.stride).full_tensor()


def not_a_view(module: nn.Module, args: object, output: object) -> object:
    """A forward hook: the module's tensor output as a tensor of its own, not a view. FSDP2 warns on every view a
    wrapped module returns (an in-place op on it would skip the pre-backward hook); a Linear on 3-d input returns
    one (the projector's output), and the copy is the size of the embeddings, nothing beside the encoder's work."""
    if isinstance(output, torch.Tensor) and output._base is not None:
        return output.clone()
    return None
