"""The label convention shared by every dataset and the loss normalizer: next-token targets, -100 ignored.

`labels[t]` is the target of position t. A position is scored when its label is not -100 and neither its
input nor its label is a modality's special token id. That last rule mirrors `MimoModel.language_loss`
(which masks `_is_special(input_ids) | _is_special(labels)`); `loss_token_mask` is the one place the data
side states it, so the per-token normalizer counts exactly the positions the model scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mimo.models.decoder import IGNORE_INDEX


def special_ids_tensor(special_token_ids: Mapping[str, int] | Iterable[int], device: torch.device) -> torch.Tensor:
    """The special token ids as a 1-D LongTensor; accepts the model's {modality: id} map or plain ids."""
    ids = special_token_ids.values() if isinstance(special_token_ids, Mapping) else special_token_ids
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def loss_token_mask(
    input_ids: torch.Tensor, labels: torch.Tensor, special_token_ids: Mapping[str, int] | Iterable[int]
) -> torch.Tensor:
    """Where the language loss scores a label; mirrors `MimoModel.language_loss` (keep the two in step)."""
    special = special_ids_tensor(special_token_ids, labels.device)
    masked = torch.isin(input_ids, special) | torch.isin(labels, special)
    return (labels != IGNORE_INDEX) & ~masked


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """1-D next-token targets: `labels[t] = input_ids[t + 1]`, the last position ignored."""
    if input_ids.dim() != 1:
        raise ValueError(f"next_token_labels takes one sample's 1-D input_ids, got shape {tuple(input_ids.shape)}")
    return torch.cat([input_ids[1:], input_ids.new_full((1,), IGNORE_INDEX)])
