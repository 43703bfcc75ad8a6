"""The projection from an encoder's width to the language model's: LLaVA-1.5's `mlp2x_gelu`."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel


class MLPProjector(nn.Module):
    """Linear → GELU (exact, erf) → Linear, both with biases, as LLaVA-1.5's multimodal projector."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None) -> None:
        """Build fc1 (in → hidden) and fc2 (hidden → out); hidden defaults to `out_features`, as in LLaVA."""
        super().__init__()
        hidden_features = hidden_features or out_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    @property
    def out_features(self) -> int:
        """Width of the projected tokens (the language model's hidden size)."""
        return self.fc2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] → [..., out]."""
        return self.fc2(self.act(self.fc1(x)))

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """fc1 column-sharded, fc2 row-sharded: one all-reduce, replicated output."""
        return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
