"""The Qwen-VL towers' `tp_plan()` on TP ranks: outputs and gradients equal the unsharded tower's (run in
`test_tensor_parallel`'s encoder world, which it shares rather than start processes of its own).

The fused q|k|v is sharded by plain rows (what checkpoints and `HFWeights` read) and each rank keeps its heads of
q, k and v (`FusedColwiseParallel`); plain `ColwiseParallel` would hand rank 0 all of q's heads and none of v's,
and the outputs would differ.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module

from mimo.models import init_parameters
from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower

GRID = torch.tensor([[1, 8, 10], [1, 6, 4], [2, 4, 6]])


def _loss(out) -> torch.Tensor:
    return out.embeddings.pow(2).sum() + sum(d.pow(2).sum() for d in out.deepstack)


def _compare(rank: int, world: int, tower_class, config) -> list[str]:
    """Differences between the TP tower and the whole one: output, every gradient (global views)."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = tower_class(config).double()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0.0, 0.3)
    sharded = parallelize_module(copy.deepcopy(full), mesh, full.tp_plan())
    qkv = sharded.blocks["0"].attn.qkv.weight
    assert qkv.placements == (Shard(0),)
    assert qkv.to_local().shape == (3 * config.hidden_size // world, config.hidden_size)
    mlp_in = next(p for n, p in sharded.named_parameters() if n.startswith("blocks.0.mlp."))  # gate / fc1
    assert isinstance(mlp_in, DTensor) and mlp_in.to_local().shape[0] == config.intermediate_size // world
    pixels = torch.randn(int(GRID.prod(-1).sum()), config.patch_dim, dtype=torch.float64)
    expected, out = full(pixels, GRID), sharded(pixels, GRID)
    _loss(expected).backward()
    _loss(out).backward()
    problems = [] if torch.allclose(out.embeddings, expected.embeddings, rtol=1e-10, atol=1e-12) else ["output"]
    grads = {name: p.grad for name, p in full.named_parameters()}
    for name, p in sharded.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if not torch.allclose(grad, grads[name], rtol=1e-9, atol=1e-12):
            problems.append(name)
    return problems


def _meta_built(rank: int, world: int, tower_class, config) -> list[str]:
    """Built on the meta device, TP applied, then `init_parameters`: every shard holds its slice of the values a
    whole tower gets (what a training run does; no rank ever holds a whole tower)."""
    mesh = init_device_mesh("cpu", (world,))
    full = tower_class(config)
    init_parameters(full, seed=5)
    with torch.device("meta"):
        sharded = tower_class(config)
    parallelize_module(sharded, mesh, sharded.tp_plan())
    init_parameters(sharded, seed=5)
    values = dict(full.named_parameters())
    return [f"init {name}" for name, p in sharded.named_parameters()
            if not torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, values[name])]


def qwen_towers_tp_problems(rank: int, world: int) -> list[str]:
    """What differs between the TP towers (both families) and the whole ones: nothing, if the plans are right."""
    towers = [(Qwen25VisionTower, Qwen25VisionConfig.tiny()), (Qwen3VisionTower, Qwen3VisionConfig.tiny())]
    return [problem for tower_class, config in towers
            for problem in _compare(rank, world, tower_class, config) + _meta_built(rank, world, tower_class, config)]
