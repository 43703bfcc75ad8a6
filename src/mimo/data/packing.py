"""Sequence packing: a micro-batch's samples laid end to end in one row, so no compute goes to padding.

Sampling, DP sharding and micro-batching stay by sample (`MimoBatch.shard` / `microbatch`), so the loss's
normalizer, the bridge's per-sample counts and the data position of a checkpoint do not change. Only the
language model's text changes shape: `PackedText` turns a micro-batch share [b, S] into one row [1, T],
with each token's rotary position (restarting at 0 per sample) and its sample's number (`document_ids`,
which the decoder turns into attention isolated per sample). `PaddedText` is the unpacked layout, behind
the same interface, so the training step has one path.

A sample keeps its positions up to its last scored label or modality token: nothing after that can change
the loss (attention is causal), and the labels are per-sample next-token targets (`next_token_labels`),
so a sample's last kept label never points into the next sample. Modality tokens stay in sample order,
so embeddings written at the row's special-token positions land where they did unpacked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from mimo.data.batch import MimoBatch
from mimo.data.positions import MRopePositions
from mimo.models.attention import document_bounds
from mimo.models.labels import IGNORE_INDEX, is_special, loss_token_mask
from mimo.models.transfer import to_device

SpecialIds = Mapping[str, int] | Iterable[int]


@dataclass
class LanguageText:
    """A micro-batch share's text as the language model reads it: ids and labels [R, T]; for a packed row,
    each token's position and document (sample) number; `longest` the most positions one sample uses.
    `scored_positions`: the flat indices (into R·T) of the positions with a label, found on the host where the
    text is arranged, so the head computes logits there alone with no host sync (`Decoder.loss`); a superset of
    what the loss scores (modality positions are ignored later), which changes nothing: ignored rows add 0.
    `document_bounds`: a packed row's cumulative sample lengths (`attention.document_bounds`), found on the host
    too, so the GPU's varlen attention reads no count back."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    scored_positions: torch.Tensor | None = None
    document_bounds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scored_positions is None:
            self.scored_positions = scored_positions(self.labels)
        if self.document_bounds is None and self.document_ids is not None:
            self.document_bounds = document_bounds(self.document_ids)

    @property
    def longest(self) -> int:
        """Positions the longest sample takes (the rotary table must cover them); read on the host copy."""
        if self.position_ids is None:
            return self.input_ids.shape[1]
        return int(self.position_ids.max()) + 1 if self.position_ids.numel() else 0

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The decoder's layout arguments: none for padded rows numbered 0, 1, ...; positions (M-RoPE's [3, R, T]
        too) and, for a packed row, documents; and the positions its head scores."""
        kwargs = {"position_ids": self.position_ids, "document_ids": self.document_ids,
                  "document_bounds": self.document_bounds, "scored_positions": self.scored_positions}
        return {k: v for k, v in kwargs.items() if v is not None}

    def to(self, device: torch.device | str) -> LanguageText:
        """The same text on `device`, copied from pinned memory without blocking the host (CPU: itself)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_device(t, device)

        return LanguageText(copy(self.input_ids), copy(self.labels), copy(self.position_ids), copy(self.document_ids),
                            copy(self.scored_positions), copy(self.document_bounds))


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of `labels`' positions that hold a target (not IGNORE_INDEX), in order."""
    return labels.flatten().ne(IGNORE_INDEX).nonzero().flatten()


@dataclass(frozen=True)
class _Rounded:
    """A text layout whose row length is rounded up to a positive `multiple` (`rounded`); `positions_rule` numbers
    the tokens where the language model does not count 0, 1, 2, ... (M-RoPE: `data.positions`)."""

    multiple: int = 1
    positions_rule: MRopePositions | None = None
    _what: ClassVar[str]  # for the refusal: "padding" or "packing"

    def __post_init__(self) -> None:
        """A length is rounded to a positive multiple."""
        if self.multiple < 1:
            raise ValueError(f"{self._what} multiple must be positive, got {self.multiple}")

    def rounded(self, length: int) -> int:
        """`length` rounded up to the multiple."""
        return -(-length // self.multiple) * self.multiple


@dataclass(frozen=True)
class PaddedText(_Rounded):
    """One sample per row, padded to the batch's width (the layout without packing), rounded up to a multiple of
    `multiple` (fewer distinct widths: a model compiled with static shapes compiles once per width). The added
    columns carry no label and come after every sample's tokens, so causal attention keeps them out of the loss."""

    _what: ClassVar[str] = "padding"

    def arrange(self, share: MimoBatch, special_token_ids: SpecialIds,
                extents: torch.Tensor | None = None) -> LanguageText:
        """The share's rows as they are, widened with unlabelled columns to a multiple (every position kept:
        the ids and `extents` are not read)."""
        extra = self.width(share.input_ids.shape[1]) - share.input_ids.shape[1]
        ids, labels = share.input_ids, share.labels
        if extra:
            ids = torch.nn.functional.pad(ids, (0, extra), value=0)
            labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX)
        positions = None if self.positions_rule is None else self.positions_rule.rows(ids, share)
        return LanguageText(ids, labels, positions)

    def width(self, width: int) -> int:
        """A row's width once rounded."""
        return self.rounded(width)

    def positions(self, extents: torch.Tensor, width: int) -> int:
        """Positions the language model computes for a share of samples with these `sample_extents`: every
        row, padding included."""
        return extents.numel() * self.width(width)

    def documents(self, extents: torch.Tensor) -> None:
        """The documents a row's attention is confined to: none, each padded row attends over itself."""
        return None


@dataclass(frozen=True)
class PackedText(_Rounded):
    """A share's samples end to end in one row [1, T]; T rounded up to a multiple of `multiple` (kernels
    favour round lengths, and fewer distinct lengths mean fewer compilations), the tail a document of its own
    with no labels."""

    _what: ClassVar[str] = "packing"

    def arrange(self, share: MimoBatch, special_token_ids: SpecialIds,
                extents: torch.Tensor | None = None) -> LanguageText:
        """Each sample's kept positions (see the module docstring) one after another, then the tail; `extents`
        the share's `sample_extents` where the caller has them (the trainer finds them once per step)."""
        if extents is None:
            extents = sample_extents(share.input_ids, share.labels, special_token_ids)
        lengths = extents.tolist()
        ids = [share.input_ids[i, :n] for i, n in enumerate(lengths)]
        labels = [share.labels[i, :n] for i, n in enumerate(lengths)]
        positions = [torch.arange(n) for n in lengths]
        documents = [torch.full((n,), i) for i, n in enumerate(lengths)]
        used = sum(lengths)
        tail = self.row_length(used) - used
        ids.append(share.input_ids.new_zeros(tail))
        labels.append(share.labels.new_full((tail,), IGNORE_INDEX))
        positions.append(torch.zeros(tail, dtype=torch.long))
        documents.append(torch.full((tail,), len(lengths)))
        text = LanguageText(*(torch.cat(parts).unsqueeze(0) for parts in (ids, labels, positions, documents)))
        if self.positions_rule is not None:
            text.position_ids = self.positions_rule.packed(text.input_ids, text.document_ids, share)
        return text

    def row_length(self, used: int) -> int:
        """The packed row's length for `used` kept positions: rounded up, and at least one (no empty row)."""
        return self.rounded(max(used, 1))

    def positions(self, extents: torch.Tensor, width: int) -> int:
        """Positions the language model computes for a share of samples with these `sample_extents`: its
        packed row, the rounding tail included."""
        return self.row_length(int(extents.sum()))

    def documents(self, extents: torch.Tensor) -> tuple[int, ...]:
        """Each sample's length in the packed rows, within which alone it attends (what the FLOP count needs);
        a sample with nothing to keep adds no document."""
        return tuple(int(n) for n in extents.tolist() if n > 0)


def sample_extents(input_ids: torch.Tensor, labels: torch.Tensor, special_token_ids: SpecialIds) -> torch.Tensor:
    """Per row of [N, S] text, one past its last position that is scored or holds a modality token (0 if none):
    what a sample keeps when packed."""
    needed = loss_token_mask(input_ids, labels, special_token_ids) | is_special(input_ids, special_token_ids)
    last = torch.where(needed, torch.arange(1, input_ids.shape[1] + 1), 0)
    return last.max(dim=1).values if input_ids.shape[1] else input_ids.new_zeros(input_ids.shape[0])


def real_tokens(batch: MimoBatch, special_token_ids: SpecialIds) -> int:
    """A batch's real tokens, what throughput counts: each sample's positions up to its last scored label or
    modality token (`sample_extents`), so no padding, and no trailing position that cannot change the loss."""
    return int(sample_extents(batch.input_ids, batch.labels, special_token_ids).sum())


TextLayout = PaddedText | PackedText
