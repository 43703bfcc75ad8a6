"""Next-token labels for the datasets; which of them the loss scores is `mimo.models.labels`."""

from __future__ import annotations

import torch

from mimo.models.labels import IGNORE_INDEX, loss_token_mask

__all__ = ["loss_token_mask", "next_token_labels"]


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """1-D next-token targets: `labels[t] = input_ids[t + 1]`, the last position ignored."""
    if input_ids.dim() != 1:
        raise ValueError(f"next_token_labels takes one sample's 1-D input_ids, got shape {tuple(input_ids.shape)}")
    return torch.cat([input_ids[1:], input_ids.new_full((1,), IGNORE_INDEX)])
