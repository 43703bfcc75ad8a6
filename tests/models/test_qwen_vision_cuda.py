"""On a GPU (skipped without one): the towers' CUDA attention (compiled flex_attention with a block-diagonal block
mask) equals the explicit-mask SDPA, forward and backward, and a packed tower on the GPU equals it on the CPU."""

from __future__ import annotations

import pytest
import torch

from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower
from mimo.models.segment_attention import FlexSegmentAttention, MaskedSegmentAttention, segment_attention

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
