"""The packed Qwen-VL tower's FLOP formula equals `FlopCounterMode` on a real pass, windows and frames apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mimo.flops import attention_flops, qwen_vision_flops
from mimo.models import qwen_vision
from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower
from mimo.models.qwen_vision_geometry import vision_geometry, window_sizes

GRID = [[1, 8, 10], [1, 6, 4], [2, 4, 6]]


class PerSegment:
    """Attention one segment at a time: the counter then sees Σ S² (what the block-diagonal mask keeps), not
    the call's N² that an explicit mask makes SDPA compute. A stand-in for the varlen/flex kernel."""

    def __init__(self, lengths, device, dtype=None) -> None:
        self.lengths = list(lengths)

    def __call__(self, q, k, v):
        parts = zip(*(t.split(self.lengths, dim=2) for t in (q, k, v)), strict=True)
        return torch.cat([F.scaled_dot_product_attention(*p) for p in parts], dim=2)


@pytest.mark.parametrize("tower_class, config, trainable", [(Qwen25VisionTower, Qwen25VisionConfig.tiny(), True),
                                                            (Qwen3VisionTower, Qwen3VisionConfig.tiny(), True),
                                                            (Qwen25VisionTower, Qwen25VisionConfig.tiny(), False)])
def test_formula_equals_the_flop_counter(monkeypatch, tower_class, config, trainable):
    monkeypatch.setattr(qwen_vision, "segment_attention", PerSegment)
    tower = tower_class(config).requires_grad_(trainable)
    grid = torch.tensor(GRID)
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if trainable:
            out = tower(pixels, grid)
            (out.embeddings.sum() + sum(d.sum() for d in out.deepstack)).backward()
        else:
            with torch.no_grad():
                tower(pixels, grid)
    assert counter.get_total_flops() == qwen_vision_flops(config, GRID, trainable=trainable).total


def test_windowed_and_full_attention_are_counted_apart():
    config = Qwen25VisionConfig.tiny()  # 4 layers, layer 2 full; windows of 3×3 merged tokens
    flops = qwen_vision_flops(config, GRID)
    frames = [80, 24, 24, 24]
    assert flops.full_attention == sum(attention_flops(s, 32, 1, 1, backward=True) for s in frames)
    windows = vision_geometry(torch.tensor(GRID), 2, 152, window_tokens=3).window_lengths
    assert [s for t, h, w in GRID for s in window_sizes(t, h, w, 2, 3)] == list(windows)
    assert flops.window_attention == sum(attention_flops(s, 32, 3, 1, backward=True) for s in windows)
    assert qwen_vision_flops(Qwen3VisionConfig.tiny(), GRID).window_attention == 0
