"""The Qwen-VL towers' `tp_plan()` on 2 gloo ranks: outputs and gradients equal the unsharded tower's.

The fused q|k|v projection is sharded part by part (`FusedColwiseParallel`): each rank's local output holds its
heads of q, k and v, while the parameter's global view stays Hugging Face's layout. A plain colwise split of it
would hand rank 0 all of q's heads and half of k's, and the outputs would differ.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower
from mimo.testing import run_distributed

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
    qkv = sharded.blocks[0].attn.qkv.weight
    assert qkv.to_local().shape == (3 * config.hidden_size // world, config.hidden_size)
    assert torch.equal(qkv.full_tensor(), full.blocks[0].attn.qkv.weight)  # global view: HF's layout
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


def _both_towers(rank: int, world: int) -> list[str]:
    return (_compare(rank, world, Qwen25VisionTower, Qwen25VisionConfig.tiny())
            + _compare(rank, world, Qwen3VisionTower, Qwen3VisionConfig.tiny()))


def test_tp2_towers_equal_the_whole_towers():
    assert run_distributed(_both_towers, 2) == [[], []]
