"""mimo.ddp_shards: the private torch it relies on still means what it did, and its local shards behave as DTensors.

Each test names what torch moved when it fails: the module's docstring lists the private names, and these tests are
how a torch upgrade finds out (torch 2.11 broke this path once). Real gloo process groups, 2 ranks, float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._api import _FromTorchTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from mimo.ddp_shards import (
    arm_reducer,
    as_dtensor,
    as_local,
    copy_into_shard,
    dtensor_params,
    full_tensor,
    is_local_shard,
    localize,
    not_a_view,
    sharding,
    sum_partial_grads,
)
from mimo.testing import run_distributed

WORLD = 2


# -- torch's private names, as this module calls them ------------------------------------------------------
def test_from_torch_tensor_forward_takes_the_positional_arguments_mimo_passes() -> None:
    names = list(inspect.signature(_FromTorchTensor.forward).parameters)[:7]
    assert names == ["ctx", "input", "device_mesh", "placements", "run_check", "shape", "stride"], (
        f"torch moved torch.distributed.tensor._api._FromTorchTensor.forward's positional arguments (now {names}); "
        f"mimo.ddp_shards._ShardView.forward calls it as (ctx, local, mesh, placements, run_check, shape, stride)")
    assert issubclass(_FromTorchTensor, torch.autograd.Function), (
        "torch's _FromTorchTensor is no longer an autograd Function; mimo.ddp_shards._ShardView subclasses it")


def test_ddp_has_the_reducer_mimo_arms() -> None:
    assert hasattr(getattr(dist, "Reducer", None), "prepare_for_backward"), (
        "torch.distributed.Reducer has no prepare_for_backward any more; mimo.ddp_shards.arm_reducer calls a DDP's "
        "`reducer.prepare_for_backward([])` before the last backward of a step (its behaviour: the armed test below)")


def test_module_registration_keeps_the_order_and_tells_parameters_from_attributes() -> None:
    linear = nn.Linear(2, 2)
    order = [n for n, _ in linear.named_parameters()]
    linear.weight = nn.Parameter(torch.zeros(2, 2))  # replacing one: in place
    assert [n for n, _ in linear.named_parameters()] == order, "nn.Module.__setattr__ no longer replaces a " \
        "parameter in place; mimo.ddp_shards.localize relies on it to keep the registration order"
    weight = linear.weight
    delattr(linear, "weight")
    linear.weight = torch.ones(2, 2)  # a plain tensor once the parameter is gone: an attribute
    assert [n for n, _ in linear.named_parameters()] == ["bias"] and torch.equal(linear.weight, torch.ones(2, 2)), \
        "nn.Module no longer sets a tensor as a plain attribute after delattr; mimo.ddp_shards._as_dtensors needs it"
    delattr(linear, "weight")
    linear.register_parameter("weight", weight)
    assert linear.weight is weight and [n for n, _ in linear.named_parameters()] == ["bias", "weight"]


# -- on a real mesh --------------------------------------------------------------------------------------
def _mesh():
    return init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))


def _tp_mlp(mesh) -> nn.Sequential:
    """A 2-layer MLP, column- then row-parallel over `mesh`: Shard(0), Shard(1) and a Replicate bias."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.ReLU(), nn.Linear(6, 3, dtype=torch.float64))
    return parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def localized_mlp_matches_dtensor_mlp(rank: int, world: int) -> None:
    """A localized TP module: the same outputs and gradients as the DTensor one, its parameters plain shards."""
    mesh = _mesh()
    reference, local = _tp_mlp(mesh), _tp_mlp(mesh)
    names = [n for n, _ in local.named_parameters()]
    localize(local)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second forward finds the shards registered again
        want, got = reference(x), local(x)
        assert torch.equal(got, want)
        want.sum().backward()
        got.sum().backward()
        assert [n for n, _ in local.named_parameters()] == names
    for (name, p), (_, q) in zip(local.named_parameters(), reference.named_parameters(), strict=True):
        assert not isinstance(p, DTensor) and is_local_shard(p) and sharding(p) == sharding(q), name
        assert torch.equal(p.grad, q.grad.to_local()), f"{name}: the local shard's gradient is not the DTensor's"
        assert torch.equal(full_tensor(p.grad, p), q.grad.full_tensor()), name
        view = as_dtensor(p.detach(), p)
        assert isinstance(view, DTensor) and view.to_local().data_ptr() == p.data_ptr(), name
        assert torch.equal(as_local(view, p), p.detach()) and as_local(p.detach(), p) is not None, name
    with dtensor_params(local):
        assert all(isinstance(m.weight, DTensor) for m in (local[0], local[2]))
        assert not list(local.parameters())
    assert [n for n, _ in local.named_parameters()] == names
    tied_weight_stays_one_parameter(mesh)


def tied_weight_stays_one_parameter(mesh) -> None:
    """A weight two modules share (tied embeddings) is one local shard, whose gradient sums both uses (two shards
    were two parameters: TP x DP runs of tied models drifted from the single-process one)."""
    tied = parallelize_module(nn.ModuleDict({"a": nn.Linear(4, 6, bias=False, dtype=torch.float64),
                                             "b": nn.Linear(4, 6, bias=False, dtype=torch.float64)}),
                              mesh, {"a": ColwiseParallel(), "b": ColwiseParallel()})
    tied.b.weight = tied.a.weight
    localize(tied)
    assert tied.a.weight is tied.b.weight and len(list(tied.parameters())) == 1
    x = torch.ones(2, 4, dtype=torch.float64)
    with dtensor_params(tied):
        (tied.a(x).sum() + 2 * tied.b(x).sum()).backward()
    assert torch.equal(tied.a.weight.grad, torch.full_like(tied.a.weight, 6.0))  # 2 rows x (1 + 2)


def test_localized_module_computes_as_its_dtensors() -> None:
    run_distributed(localized_mlp_matches_dtensor_mlp, WORLD)


def partial_gradient_comes_back_unreduced(rank: int, world: int) -> list[float]:
    """A replicated weight whose DTensor gradient is partial (each rank's rows' share) comes back to its local shard
    unreduced through `_FromTorchTensor.backward`'s replacement, and `sum_partial_grads` makes it the whole sum."""
    mesh = _mesh()
    owner = nn.Module()
    owner.weight = nn.Parameter(distribute_tensor(torch.arange(3, dtype=torch.float64) + 1, mesh, [Replicate()]))
    localize(owner)
    owner.forward = lambda x: x * owner.weight  # noqa: E731 - a module whose forward multiplies by its weight
    rows = torch.full((1, 3), float(rank + 1), dtype=torch.float64)  # rank r's row of a Shard(0) input
    x = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)
    owner(x).to_local().sum().backward()  # the weight's DTensor gradient: Partial over tp
    local = owner.weight
    assert torch.equal(local.grad, rows[0]), "the partial gradient was reduced in the backward, not left for mimo"
    sum_partial_grads([local])
    assert torch.equal(local.grad, torch.full((3,), 3.0, dtype=torch.float64))  # 1 + 2: summed over TP once
    return local.grad.tolist()


def test_a_partial_gradient_of_a_replicated_shard_is_summed_once() -> None:
    assert run_distributed(partial_gradient_comes_back_unreduced, WORLD) == [[3.0, 3.0, 3.0]] * 2


def loaded_values_reach_the_shard(rank: int, world: int) -> None:
    """A loaded DTensor reaches the local shard, copied or, for a view of it, left alone."""
    mesh = _mesh()
    module = _tp_mlp(mesh)
    localize(module)
    p = module[0].weight
    loaded = distribute_tensor(torch.full((6, 4), 7.0, dtype=torch.float64), mesh, [Shard(0)])
    copy_into_shard(p, loaded)
    assert torch.equal(p.detach(), torch.full((3, 4), 7.0, dtype=torch.float64))
    view = as_dtensor(p.detach(), p)
    copy_into_shard(p, view)  # a view of the shard: nothing to copy
    assert torch.equal(view.full_tensor(), torch.full((6, 4), 7.0, dtype=torch.float64))


def test_a_loaded_dtensor_reaches_the_local_shard() -> None:
    run_distributed(loaded_values_reach_the_shard, WORLD)


def armed_reducer_reduces(rank: int, world: int, arm: bool) -> list[float]:
    """A DDP forward under `no_sync`, then its backward: reduced over the ranks only if `arm_reducer` ran first."""
    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Linear(2, 1, bias=False, dtype=torch.float64))
    with ddp.no_sync():
        out = ddp(torch.full((1, 2), float(rank + 1), dtype=torch.float64))
    if arm:
        arm_reducer(ddp)
    out.sum().backward()
    dist.barrier()
    return ddp.module.weight.grad.flatten().tolist()


@pytest.mark.parametrize("arm", [True, False], ids=["armed", "not-armed"])
def test_arm_reducer_makes_the_next_backward_reduce(arm: bool) -> None:
    grads = run_distributed(armed_reducer_reduces, WORLD, arm)
    want = [[1.5, 1.5]] * 2 if arm else [[1.0, 1.0], [2.0, 2.0]]  # DDP's default hook averages
    assert grads == want, ("DistributedDataParallel.reducer.prepare_for_backward([]) no longer arms the reducer "
                           "for a backward whose forward ran under no_sync" if arm else "the control")


def test_a_linear_on_3d_input_returns_a_view_that_not_a_view_copies() -> None:
    """`Tensor._base` still tells a view (what `not_a_view` reads, FSDP2's path): a Linear over [N, T, H] returns
    one, and the hook's copy is no view but holds the same values."""
    layer = nn.Linear(4, 3)
    out = layer(torch.randn(2, 5, 4))
    assert out._base is not None, "torch moved Tensor._base: a Linear's 3-d output no longer reads as a view"
    copied = not_a_view(layer, (), out)
    assert copied is not None and copied._base is None and torch.equal(copied, out)
    assert not_a_view(layer, (), out.clone()) is None
