"""Positions of a language model that does not number its tokens 0, 1, 2, ...: Qwen-VL's M-RoPE, where each token
has a (temporal, height, width) position and an image's tokens share the text's position with their own row and
column (`models.mrope`). The text layouts (`data.packing`) ask a rule for a share's positions, padded or packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.data.batch import MimoBatch
from mimo.models.mrope import get_rope_index, packed_rope_index


@dataclass(frozen=True)
class MRopePositions:
    """M-RoPE positions [3, R, T] from a share's image tokens (`token_id`) and its images' grids (`modality`'s
    `item_grids`, patches merged `merge` × `merge` into one token)."""

    modality: str
    token_id: int
    merge: int

    def rows(self, input_ids: torch.Tensor, share: MimoBatch) -> torch.Tensor:
        """Padded rows' positions: each row numbered as transformers' `get_rope_index` numbers it (padding after a
        sample's tokens changes none of theirs)."""
        return get_rope_index(input_ids, self._grids(share), self.merge, self.token_id)[0]

    def packed(self, input_ids: torch.Tensor, document_ids: torch.Tensor, share: MimoBatch) -> torch.Tensor:
        """A packed row's positions: each document numbered from 0, as the sample it is."""
        return packed_rope_index(input_ids, document_ids, self._grids(share), self.merge, self.token_id)

    def _grids(self, share: MimoBatch) -> torch.Tensor | None:
        """The share's images' grids in order, or None without images."""
        items = share.modality_inputs.get(self.modality)
        return None if items is None or items.item_grids is None or not len(items.item_grids) else items.item_grids
