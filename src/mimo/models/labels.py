"""Which positions the language loss scores: the one statement of the rule, for the model and the data.

`labels[t]` is the target of position t. A position is scored when its label is not -100 and neither its
input nor its label is a modality's special token id (modality positions never carry a label). The model
masks with it; the data counts with it, so the per-token normalizer counts exactly what the model scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

IGNORE_INDEX = -100


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
