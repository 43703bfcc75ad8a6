"""On a GPU (skipped without one): the towers' CUDA attention (flash's varlen kernel in bf16, compiled
flex_attention with a block-diagonal block mask in float32) equals the explicit-mask SDPA, forward and backward,
and a packed tower on the GPU equals it on the CPU (float32) and its float32 self within bf16's error (bf16)."""

from __future__ import annotations

import pytest
import torch

from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower
from mimo.models.segment_attention import (
    FlexSegmentAttention,
    MaskedSegmentAttention,
    VarlenSegmentAttention,
    segment_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_flex_segment_attention_matches_the_explicit_mask_forward_and_backward():
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [10, 300, 5, 200, 85, 250, 150]  # 1000 positions, blocks cut mid-segment
    q, k, v = (torch.randn(1, 8, 1000, 64, device="cuda", generator=gen, requires_grad=True) for _ in range(3))
    results = []
    for attention in (FlexSegmentAttention(lengths, "cuda"), MaskedSegmentAttention(lengths, "cuda")):
        out = attention(q, k, v)
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 1e-4, f"{name}: flex differs from the explicit mask by {rel:.1e} (float32)"
    assert isinstance(segment_attention(lengths, "cuda"), FlexSegmentAttention)


@pytest.mark.parametrize("tower_class, config", [(Qwen25VisionTower, Qwen25VisionConfig.tiny()),
                                                 (Qwen3VisionTower, Qwen3VisionConfig.tiny())])
def test_a_packed_tower_on_the_gpu_equals_it_on_the_cpu(tower_class, config):
    torch.manual_seed(0)
    tower = tower_class(config)
    grid = torch.tensor([[1, 8, 10], [1, 6, 4], [2, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim)
    with torch.no_grad():
        cpu = tower(pixels, grid)
        gpu = tower.cuda()(pixels.cuda(), grid.cuda())
    for got, want in zip((gpu.embeddings, *gpu.deepstack), (cpu.embeddings, *cpu.deepstack), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_varlen_segment_attention_matches_the_explicit_mask_in_bf16_forward_and_backward():
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [10, 300, 0, 5, 200, 85, 250, 150]  # an empty window too
    q, k, v = (torch.randn(1, 8, 1000, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
               for _ in range(3))
    results = []
    for attention, cast in ((VarlenSegmentAttention(lengths, "cuda"), torch.bfloat16),
                            (MaskedSegmentAttention(lengths, "cuda"), torch.float32)):
        out = attention(*(t.to(cast) for t in (q, k, v))).float()
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        assert rel < 2e-2, f"{name}: varlen differs from the explicit mask by {rel:.1e} (bf16)"
    assert isinstance(segment_attention(lengths, "cuda", torch.bfloat16), VarlenSegmentAttention)


@pytest.mark.parametrize("tower_class, config", [(Qwen25VisionTower, Qwen25VisionConfig.tiny()),
                                                 (Qwen3VisionTower, Qwen3VisionConfig.tiny())])
def test_a_packed_tower_under_bf16_autocast_stays_near_its_float32_self(tower_class, config):
    torch.manual_seed(0)
    tower = tower_class(config).cuda()
    grid = torch.tensor([[1, 8, 10], [1, 6, 4], [2, 4, 6]], device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim, device="cuda")
    with torch.no_grad():
        wide = tower(pixels, grid).embeddings
        with torch.autocast("cuda", torch.bfloat16):
            half = tower(pixels, grid).embeddings.float()
    rel = float((half - wide).abs().max() / wide.abs().max())
    assert rel < 5e-2, f"bf16 tower (varlen) differs from float32 (flex) by {rel:.1e}"


@pytest.mark.parametrize("tower_class, config", [(Qwen25VisionTower, Qwen25VisionConfig.tiny()),
                                                 (Qwen3VisionTower, Qwen3VisionConfig.tiny())])
def test_a_tower_on_the_gpu_takes_the_grids_on_the_cpu_as_the_step_passes_them(tower_class, config):
    """The training step hands a tower its items on the GPU and `item_grids` on the CPU (host metadata): the
    geometry built from them goes where the patches are (the rotary tables and position taps with it)."""
    torch.manual_seed(0)
    tower = tower_class(config)
    grid = torch.tensor([[1, 8, 10], [1, 6, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim)
    with torch.no_grad():
        cpu = tower(pixels, grid)
        gpu = tower.cuda()(pixels.cuda(), grid)
    torch.testing.assert_close(gpu.embeddings.cpu(), cpu.embeddings, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tower_class, config", [(Qwen25VisionTower, Qwen25VisionConfig.tiny()),
                                                 (Qwen3VisionTower, Qwen3VisionConfig.tiny())])
def test_a_tower_call_never_blocks_the_host(tower_class, config):
    """A training step's tower call (patches on the GPU, grids on the CPU, bf16 autocast: the varlen kernel)
    forward and backward makes no host sync: its geometry and segment lengths are built on the host and cross
    from pinned memory (`mimo.models.transfer`); a pageable copy or a device `repeat_interleave` would sync."""
    import warnings

    torch.manual_seed(0)
    tower = tower_class(config).cuda()
    grid = torch.tensor([[1, 8, 10], [1, 6, 4], [2, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim, device="cuda")

    def call() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tower(pixels, grid).embeddings.float().square().sum().backward()

    call()  # first use: kernels, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
