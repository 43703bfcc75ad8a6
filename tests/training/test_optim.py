"""Optimizers take the path CUDA takes: fused AdamW on every device, no group mixing DTensors and tensors.

On two H200s a homogeneous TP2 run died in its first step ("_foreach_lerp_ got mixed torch.Tensor and DTensor"):
a TP module without a DP wrapper holds DTensor weights and plain norm weights, and CUDA's multi-tensor AdamW
cannot take both in one list. CPU AdamW used to default to its per-tensor loop, so CI never saw it.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from mimo.ddp_shards import full_tensor
from mimo.distributed import DistributedConfig, unwrap, wrapped_modules
from mimo.testing import run_distributed
from mimo.training.optim import OptimizerConfig, build_optimizers, make_adamw, param_groups
from tests.test_provider import make_provider

# homogeneous TP2 (the layout that crashed): DP 1, so no DDP wrapper, and each module holds DTensors (sharded
# weights, the ViT's column-parallel biases) next to plain tensors (norms), in the same no-decay group
TP2 = {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}}
CONFIG = OptimizerConfig(lr=1e-2, weight_decay=0.1)


def _loss(params) -> torch.Tensor:
    """A loss that gives every parameter a distinct gradient."""
    return sum((p.sin().sum() * 1e-3 for p in params), torch.zeros((), dtype=torch.float64))


def _step_tp(rank: int, world_size: int) -> dict:
    """One AdamW step of every TP2 module on `_loss`; the updated values, and what the optimizers hold."""
    provider = make_provider(TP2, params_dtype=torch.float64, seed=7)
    model = provider.provide_distributed_model(DistributedConfig())
    optimizers = build_optimizers(model, CONFIG)
    modules = wrapped_modules(model)
    for module in modules.values():
        _loss(full_tensor(p, p) for p in module.parameters()).backward()
    for opt in optimizers.values():
        opt.step()
    groups = [g["params"] for opt in optimizers.values() for g in opt.param_groups]
    prefix = {"language": "language_model.", "images": "modality_submodules.images."}
    return {"kinds": {name: {isinstance(p, DTensor) for p in m.parameters()} for name, m in modules.items()},
            "fused": [opt.defaults["fused"] for opt in optimizers.values()],
            "mixed": sum(len({isinstance(p, DTensor) for p in g}) > 1 for g in groups), "groups": len(groups),
            "params": {prefix[name] + n: full_tensor(p.detach(), p).clone()
                       for name, m in modules.items() for n, p in unwrap(m).named_parameters()}}


def test_tp_modules_with_dtensor_and_plain_parameters_step_like_one_process():
    got = run_distributed(_step_tp, 2)[0]
    assert got["kinds"]["images"] == {True, False}, "the case needs both kinds of parameter in one module"
    assert got["fused"] == [True, True] and got["mixed"] == 0
    assert got["groups"] == 8  # per module: decay / no decay, each split into DTensors and tensors
    model = make_provider(None, params_dtype=torch.float64, seed=7).provide()
    for module in (model.language_model, model.modality_submodules["images"]):
        _loss(module.parameters()).backward()
        reference = torch.optim.AdamW(param_groups(module, CONFIG.weight_decay), lr=CONFIG.lr, betas=CONFIG.betas,
                                      eps=CONFIG.eps, foreach=False)
        reference.step()
    for name, want in model.named_parameters():
        torch.testing.assert_close(got["params"][name], want.detach(), rtol=1e-12, atol=0, msg=name)


def test_adamw_is_fused_on_cpu_too():
    layer = torch.nn.Linear(3, 3)
    opt = make_adamw(param_groups(layer, 0.0), CONFIG)
    assert opt.defaults["fused"] is True and len(opt.param_groups) == 4
