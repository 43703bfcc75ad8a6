"""Root-mean-square LayerNorm (no mean subtraction, no bias), as in Llama."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · weight, normalised in at least float32 so bf16 activations keep their precision."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        """Build the per-channel gain."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dim; float64 stays float64, bf16/fp16 are computed in float32."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
