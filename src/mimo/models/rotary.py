"""Rotary position embeddings (RoPE) in Llama's rotate-half convention, 1-D or 3-D (M-RoPE: Qwen2.5-VL/Qwen3-VL)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's frequency-dependent rope scaling (HF `rope_type: llama3`): long wavelengths are divided by
    `factor`, short ones kept, the band between interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        """The smoothing band needs high_freq_factor > low_freq_factor."""
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling: high_freq_factor {self.high_freq_factor} must exceed "
                             f"low_freq_factor {self.low_freq_factor}")

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The scaled inverse frequencies (the same formula as Hugging Face's `_compute_llama3_parameters`)."""
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class MRopeLayout:
    """Which of a token's three positions (temporal, height, width) turns each rotary frequency (M-RoPE).

    `section` (HF's `mrope_section`) counts the frequencies per axis and sums to head_dim / 2. Sectioned
    (Qwen2.5-VL): the first section[0] frequencies follow t, the next section[1] h, the last section[2] w.
    Interleaved (Qwen3-VL, HF's `apply_interleaved_mrope`): frequency j follows h if j % 3 == 1 and
    j < 3·section[1], w if j % 3 == 2 and j < 3·section[2], else t.
    """

    section: tuple[int, int, int]
    interleaved: bool = False

    def check(self, head_dim: int) -> None:
        """The sections must cover the head's head_dim / 2 frequencies exactly."""
        if len(self.section) != 3 or min(self.section) < 0 or sum(self.section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(self.section)} must be three non-negative counts summing to "
                             f"head_dim / 2 = {head_dim // 2}")

    def axes(self, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The position axis (0 t, 1 h, 2 w) of each of the head's head_dim rotary columns (both halves)."""
        t, h, w = self.section
        if self.interleaved:
            half = [0] * (head_dim // 2)
            half[1:3 * h:3] = [1] * len(half[1:3 * h:3])
            half[2:3 * w:3] = [2] * len(half[2:3 * w:3])
        else:
            half = [0] * t + [1] * h + [2] * w
        return torch.tensor(half + half, dtype=torch.long, device=device)


def mrope_tables(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                 axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, S, d] of 3-D positions [3, B, S]: column j read from tables [L, d] at the position of its
    axis `axes[j]`. One gather per table, so each value is a table entry (no re-rounding)."""
    per_column = position_ids.permute(1, 2, 0)[..., axes]  # [B, S, d]: each column's position
    columns = torch.arange(cos.shape[-1], device=cos.device)
    return cos[per_column, columns].unsqueeze(1), sin[per_column, columns].unsqueeze(1)


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None,
    scaling: Llama3RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim], computed in float64 so any later cast is exact-rounded."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    positions = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, head_dim] by position; cos/sin are [S, head_dim] and broadcast over heads."""
    return x * cos + rotate_half(x) * sin
