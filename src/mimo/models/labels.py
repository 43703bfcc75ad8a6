"""Which positions the language loss scores: the one statement of the rule, for the model and the data.

`labels[t]` is the target of position t. A position is scored when its label is not -100 and neither its
input nor its label is a modality's special token id (modality positions never carry a label). The model
masks with it; the data counts with it, so the per-token normalizer counts exactly what the model scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

IGNORE_INDEX = -100


def is_special(ids: torch.Tensor, special_token_ids: Mapping[str, int] | Iterable[int]) -> torch.Tensor:
    """Where `ids` holds a special token id; accepts the model's {modality: id} map or plain ids. Compares
    one id at a time, so no tensor of ids is copied to the device (a host sync on an accelerator)."""
    ids_ = special_token_ids.values() if isinstance(special_token_ids, Mapping) else special_token_ids
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for token_id in ids_:
        mask |= ids == token_id
    return mask


def loss_token_mask(
    input_ids: torch.Tensor, labels: torch.Tensor, special_token_ids: Mapping[str, int] | Iterable[int]
) -> torch.Tensor:
    """Where the language loss scores a label (what `MimoModel.language_labels` keeps and the data counts)."""
    masked = is_special(input_ids, special_token_ids) | is_special(labels, special_token_ids)
    return (labels != IGNORE_INDEX) & ~masked
