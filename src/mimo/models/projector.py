"""The projection from an encoder's width to the language model's: LLaVA-1.5's `mlp2x_gelu`."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from mimo.models.encoder_block import ACTIVATIONS


class MLPProjector(nn.Module):
    """Linear → activation → Linear; by default GELU (exact, erf) and biases, as LLaVA-1.5's projector."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None,
                 activation: str = "gelu", bias: bool = True) -> None:
        """Build fc1 (in → hidden) and fc2 (hidden → out); hidden defaults to `out_features`, as in LLaVA.
        `activation` is a key of `ACTIVATIONS` (LLaVA's `projector_hidden_act`)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown projector activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        hidden_features = hidden_features or out_features
        self.activation = activation
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    @property
    def out_features(self) -> int:
        """Width of the projected tokens (the language model's hidden size)."""
        return self.fc2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] → [..., out]."""
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """fc1 column-sharded, fc2 row-sharded: one all-reduce, replicated output."""
        return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
