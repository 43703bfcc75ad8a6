"""GlobalGradScaler: one fp16 loss scale for the whole world; an overflow anywhere skips every step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mimo.testing import run_distributed
from mimo.training.grad_scaler import GlobalGradScaler

ROLES = ["stub", "images", "language", "language"]  # rank 0 holds nothing; language is FSDP2 over ranks 2-3
INIT_SCALE, GROWTH_INTERVAL = 2.0**10, 2
INF_AT_STEP = 0


class Half(nn.Module):
    """A linear layer computing in fp16 on fp32 parameters (DDP-style mixed precision)."""

    def __init__(self) -> None:
        """A 4 → 4 layer, seeded so every rank of a module starts equal."""
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp16 matmul, fp32 result."""
        return nn.functional.linear(x.half(), self.lin.weight.half(), self.lin.bias.half()).float()


def build(role: str, lang_group) -> nn.Module | None:
    """This rank's module: none (stub), a plain fp16-compute layer (images) or an FSDP2 fp16 layer (language)."""
    if role == "stub":
        return None
    if role == "images":
        return Half()
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    fully_shard(lin, mesh=DeviceMesh.from_group(lang_group, "cpu"), mp_policy=policy)
    return lin


def local(t: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's storage of `t` (a DTensor's shard)."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def backward(module: nn.Module, scale: float, rank: int, step: int) -> list[torch.Tensor]:
    """Zero the grads, backprop `scale` × a fixed loss; return the grads' local storage."""
    module.zero_grad()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * step + rank))
    (module(x).float().pow(2).sum() * scale).backward()
    return [local(p.grad) for p in module.parameters()]


def scaler_steps(rank: int, world_size: int) -> list[dict]:
    """Four fp16 steps; an inf in rank 1's ('images') gradients at step 0 only. Returns per-step records."""
    lang_group = dist.new_group([2, 3])  # every rank takes part in creating it
    module = build(ROLES[rank], lang_group)
    params = [] if module is None else list(module.parameters())
    optimizers = [] if module is None else [torch.optim.SGD(params, lr=0.1)]
    scaler = GlobalGradScaler(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    records = []
    for step in range(4):
        unscaled = [] if module is None else backward(module, 1.0, rank, step)
        if module is not None:
            backward(module, scaler.scale_value, rank, step)
        if ROLES[rank] == "images" and step == INF_AT_STEP:
            params[0].grad[0, 0] = math.inf
        before = [local(p) for p in params]
        stepped = scaler.step(optimizers)
        grads_unscaled = all(torch.equal(local(p.grad), g) for p, g in zip(params, unscaled, strict=True))
        moved = any(not torch.equal(local(p), b) for p, b in zip(params, before, strict=True))
        scaler.update()
        records.append({"stepped": stepped, "scale": scaler.scale_value, "moved": moved,
                        "grads_unscaled": grads_unscaled})
    return records


def test_overflow_on_one_rank_skips_every_rank_and_scales_stay_in_lock_step():
    results = run_distributed(scaler_steps, len(ROLES))
    expected_scales = [INIT_SCALE / 2, INIT_SCALE / 2, INIT_SCALE, INIT_SCALE]  # backoff, 1 clean, growth, 1 clean
    for rank, records in enumerate(results):
        assert [r["scale"] for r in records] == expected_scales, f"rank {rank}"
        assert [r["stepped"] for r in records] == [False, True, True, True], f"rank {rank}"
        has_params = ROLES[rank] != "stub"
        assert [r["moved"] for r in records] == [False] + [has_params] * 3, f"rank {rank}"
        clean = records[1:] if ROLES[rank] == "images" else records  # the injected inf is not a scaled grad
        assert all(r["grads_unscaled"] for r in clean), f"rank {rank}: unscaled grads differ from the loss's"


def test_local_overflow_backoff_growth_and_state_dict_round_trip():
    """Single process (no world): NaN backs off, clean steps grow; a restored scaler continues identically."""
    p = nn.Parameter(torch.ones(2))
    scaler = GlobalGradScaler(init_scale=8.0, growth_interval=2)
    for grad, want in ((math.nan, 4.0), (1.0, 4.0), (1.0, 8.0), (1.0, 8.0)):
        p.grad = torch.full((2,), grad)
        scaler.unscale_([p])
        assert scaler.found_inf([p]) is math.isnan(grad)
        scaler.update()
        assert scaler.scale_value == want
    restored = GlobalGradScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict() == {
        "scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "clean_steps": 1}
    for s in (scaler, restored):  # one more clean step completes the interval on both
        p.grad = torch.ones(2)
        assert s.step([torch.optim.SGD([p], lr=0.0)])
        s.update()
    assert restored.scale_value == scaler.scale_value == 16.0


def test_unscale_twice_and_update_before_step_are_errors():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 8.0)
    scaler = GlobalGradScaler(init_scale=4.0)
    with pytest.raises(RuntimeError, match="update\\(\\) needs step\\(\\)"):
        scaler.update()
    scaler.unscale_([p])
    assert torch.equal(p.grad, torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="unscale_ was already called this step"):
        scaler.unscale_([p])
