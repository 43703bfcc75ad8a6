"""Optimizers and learning-rate schedules per module, and one global gradient norm for clipping.

Each module steps its own AdamW (modules live on different ranks and may differ in precision); steps
happen in lock-step because every rank calls `step` once per global batch. The clipping norm is one
number over every parameter of every module, each counted once: a TP shard by the rank that holds it,
a tensor replicated over TP or DP by its replica at coordinate 0, a tied head on the last pipeline stage
not at all (the embedding on stage 0 stands for it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from mimo.ddp_shards import local_tensor, sharding
from mimo.distributed import unwrap, wrapped_modules
from mimo.grid import ModuleGrid
from mimo.infra import MimoModelInfra
from mimo.models import MimoModel


@dataclass
class OptimizerConfig:
    """AdamW and a warm-up + cosine schedule (to `min_lr_ratio` · lr at `total_steps`)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.1

    def lr_factor(self, step: int) -> float:
        """The multiplier of `lr` at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; vectors (norms, biases) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def split_by_kind(groups: list[dict]) -> list[dict]:
    """Each group as two: its DTensor parameters, then its plain ones.

    A multi-tensor kernel (fused or foreach AdamW) cannot take a list that mixes DTensors and tensors, and a
    TP module holds both (sharded weights, replicated norms). Both halves are kept even when one is empty, so
    the number of groups, which the schedule's checkpoint records, is the same on every layout."""
    out = []
    for group in groups:
        for is_dtensor in (True, False):
            out.append({**group, "params": [p for p in group["params"] if isinstance(p, DTensor) == is_dtensor]})
    return out


def make_adamw(groups: list[dict], config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with the fused implementation on every device: the fastest on CUDA, and the same kernel (through
    the same DTensor dispatch) on CPU, so the CPU suite runs the code path the GPUs take."""
    return torch.optim.AdamW(split_by_kind(groups), lr=config.lr, betas=config.betas, eps=config.eps, fused=True)


def build_optimizers(model: MimoModel, config: OptimizerConfig) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per hosted module with trainable parameters."""
    optimizers = {}
    for name, module in wrapped_modules(model).items():
        groups = [g for g in param_groups(module, config.weight_decay) if g["params"]]
        if groups:
            optimizers[name] = make_adamw(groups, config)
    return optimizers


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], config: OptimizerConfig) -> dict:
    """A LambdaLR per optimizer following `config.lr_factor`."""
    return {n: torch.optim.lr_scheduler.LambdaLR(o, config.lr_factor) for n, o in optimizers.items()}


# -- global gradient norm --------------------------------------------------------------------------------
def local_grad_sq(model: MimoModel, infra: MimoModelInfra) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (a float64 device scalar), each parameter
    counted once over the world; summed over all ranks it is the squared norm.

    Local norms come from multi-tensor kernels (one launch per dtype, not one per parameter); their
    squares are summed in float64.
    """
    total = torch.zeros((), dtype=torch.float64, device=_device(model))
    grads = [local_tensor(p.grad) for name, module in wrapped_modules(model).items()
             for p in _counted_grads(module, infra.module_to_grid_map.get(name))]
    if grads:
        total += torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).double().pow(2)
    return total


def global_grad_norm(model: MimoModel, infra: MimoModelInfra) -> torch.Tensor:
    """The 2-norm over all modules' gradients, each parameter counted once; every rank must call it."""
    total = local_grad_sq(model, infra)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.sqrt()


def clip_grads(model: MimoModel | nn.Module, norm: torch.Tensor, max_norm: float | None) -> None:
    """Scale every gradient by min(1, max_norm / norm), `norm` being the global norm (no host sync)."""
    if max_norm is None:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [local_tensor(p.grad) for module in wrapped_modules(model).values() for p in module.parameters()
             if p.grad is not None]
    for dtype in {g.dtype for g in grads}:  # the coefficient stays a device tensor
        torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))


def clip_grad_norm(model: MimoModel, infra: MimoModelInfra, max_norm: float | None) -> torch.Tensor:
    """Clip with the global norm (`global_grad_norm`, `clip_grads`); returns the norm before clipping."""
    norm = global_grad_norm(model, infra)
    clip_grads(model, norm, max_norm)
    return norm


def _counted_grads(module: nn.Module, grid: ModuleGrid | None) -> Iterable[torch.Tensor]:
    """Parameters whose gradient this rank counts in the global norm.

    Along each of the module's dp, cp and tp dims, a gradient is either sharded (the spec has the dim with a
    Shard placement: every rank counts its piece) or replicated (a Replicate placement, or the dim is
    absent from the spec, e.g. a norm weight under TP or any DDP gradient): then only coordinate 0 counts.
    A CP replica is a replica like a DP one (FSDP2 shards over their joint `dp_cp` dim under CP).
    """
    inner = unwrap(module)
    aliased = set(getattr(inner, "init_aliases", dict)())  # e.g. a tied head on the last stage
    coord = ({"dp": grid.coord.dp, "cp": grid.coord.cp, "tp": grid.coord.tp} if grid is not None
             else {"dp": 0, "cp": 0, "tp": 0})
    for name, p in inner.named_parameters():
        if p.grad is not None and name not in aliased and _owned_here(sharding(p), coord):
            yield p


def _owned_here(spec, coord: dict[str, int]) -> bool:
    """True if this rank holds its own piece of the gradient along every dim (see `_counted_grads`)."""
    placements = {}
    if spec is not None:
        names = spec.mesh.mesh_dim_names or ()
        placements = {n: (pl, spec.mesh.get_local_rank(i)) for i, (n, pl) in enumerate(zip(names, spec.placements,
                                                                                            strict=True))}
    for dim, c in coord.items():
        joint = placements.get("dp_cp") if dim in ("dp", "cp") else None
        placement, local = placements.get(dim, joint or (Replicate(), c))
        if isinstance(placement, Replicate) and local != 0:
            return False
    return True


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is not None:
        return p.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
        "nccl" in str(dist.get_backend()) else torch.device("cpu")
