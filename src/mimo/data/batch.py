"""A training batch (text, labels, each modality's stacked items) and the sample slicing DP and PP need.

DESIGN §3 "Batches": every rank holds the same global batch; DP replica d of a module with DP size D owns
samples `[d·N/D, (d+1)·N/D)`, and a micro-batch is a contiguous chunk of samples. Samples carry any number
of items (0, 1, many), so a modality's items are sliced by the cumulative `items_per_sample`, never by a
fixed stride.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mimo.data.bad_samples import SkippedSample
from mimo.data.labels import loss_token_mask
from mimo.models.labels import IGNORE_INDEX
from mimo.models.mimo_model import ModalityBatch
from mimo.models.transfer import to_device


@dataclass
class Sample:
    """One sample: 1-D text ids, 1-D labels (position t's target) and, per modality, its items [k, ...], or, for
    a modality of packed items, their rows [r, D] with `item_grids[modality]` [k, g] (see `ModalityBatch`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    items: dict[str, torch.Tensor] = field(default_factory=dict)
    item_grids: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Text and labels are 1-D and of one length."""
        if self.input_ids.dim() != 1 or self.input_ids.shape != self.labels.shape:
            raise ValueError(f"a Sample needs 1-D input_ids and labels of one length, got shapes "
                             f"{tuple(self.input_ids.shape)} and {tuple(self.labels.shape)}")


@dataclass
class MimoBatch:
    """N samples: input_ids and labels [N, S], and per modality a `ModalityBatch` with items in sample order.

    `skipped` records the bad samples a global batch's builder replaced (see `mimo.data.bad_samples`); slices
    of a batch do not carry it."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    modality_inputs: dict[str, ModalityBatch] = field(default_factory=dict)
    skipped: tuple[SkippedSample, ...] = ()

    def __post_init__(self) -> None:
        """Text is [N, S] for both tensors; every modality has one item count per sample."""
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.labels.shape:
            raise ValueError(f"input_ids and labels must both be [N, S], got shapes "
                             f"{tuple(self.input_ids.shape)} and {tuple(self.labels.shape)}")
        for name, batch in self.modality_inputs.items():
            if batch.items_per_sample.shape[0] != self.num_samples:
                raise ValueError(f"modality {name!r} has items_per_sample for {batch.items_per_sample.shape[0]} "
                                 f"samples, but the batch has {self.num_samples}")

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return self.input_ids.shape[0]

    def select(self, start: int, end: int) -> MimoBatch:
        """Samples [start, end), with each modality's items cut at the cumulative per-sample counts."""
        if not 0 <= start <= end <= self.num_samples:
            raise IndexError(f"sample range [{start}, {end}) is outside [0, {self.num_samples}]")
        return MimoBatch(
            self.input_ids[start:end],
            self.labels[start:end],
            {name: batch.select(start, end) for name, batch in self.modality_inputs.items()},
        )

    def microbatch(self, m: int, num_microbatches: int) -> MimoBatch:
        """The m-th of `num_microbatches` contiguous, equal chunks of samples."""
        start, end = _chunk(self.num_samples, m, num_microbatches, "micro-batch", "num_microbatches")
        return self.select(start, end)

    def shard(self, d: int, dp_size: int) -> MimoBatch:
        """DP replica d's samples `[d·N/D, (d+1)·N/D)` (DESIGN §3 "Batches")."""
        start, end = _chunk(self.num_samples, d, dp_size, "DP rank", "dp_size")
        return self.select(start, end)

    def pin_memory(self) -> MimoBatch:
        """The same batch in page-locked host memory, so copies to a GPU need not block (slices stay pinned)."""
        return MimoBatch(self.input_ids.pin_memory(), self.labels.pin_memory(),
                         {name: b.with_items(b.items.pin_memory()) for name, b in self.modality_inputs.items()},
                         self.skipped)

    def prefetch(self, device: torch.device | str, modalities: Iterable[str] = (), text: bool = True) -> MimoBatch:
        """A batch with text and labels (if `text`) and the named modalities' items on `device`, copied from
        pinned memory (pinned here unless `pin_memory` was) without blocking the host, so the GPU queue
        stays full. Other modalities are left out;
        text not asked for and item counts stay on the CPU (where `select` reads the counts)."""
        device = torch.device(device)

        def copy(t: torch.Tensor) -> torch.Tensor:
            return to_device(t, device)

        return MimoBatch(copy(self.input_ids) if text else self.input_ids, copy(self.labels) if text else self.labels,
                         {name: self.modality_inputs[name].with_items(copy(self.modality_inputs[name].items))
                          for name in modalities})

    def num_label_tokens(self, special_token_ids: Mapping[str, int] | Iterable[int]) -> int:
        """How many labels the language loss scores: the per-token mean's denominator (see `loss_token_mask`)."""
        return int(loss_token_mask(self.input_ids, self.labels, special_token_ids).sum())

    @classmethod
    def concat(cls, batches: Sequence[MimoBatch]) -> MimoBatch:
        """Batches joined along samples (the inverse of `shard` / `microbatch`); all must have one S and modalities."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        names = list(batches[0].modality_inputs)
        for b in batches[1:]:
            if list(b.modality_inputs) != names:
                raise ValueError(f"cannot concat batches with modalities {names} and {list(b.modality_inputs)}")
        return cls(
            torch.cat([b.input_ids for b in batches]),
            torch.cat([b.labels for b in batches]),
            {n: ModalityBatch.concat([b.modality_inputs[n] for b in batches]) for n in names},
        )

    @classmethod
    def collate(cls, samples: Sequence[Sample], pad_id: int, seq_len: int | None = None) -> MimoBatch:
        """Pad text to one length (labels with -100) and stack every modality's items in sample order.

        A modality missing from a sample counts as 0 items there; `seq_len` fixes S (never truncates)."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        length = _padded_length(samples, seq_len)
        input_ids = torch.stack([_pad(s.input_ids, length, pad_id) for s in samples])
        labels = torch.stack([_pad(s.labels, length, IGNORE_INDEX) for s in samples])
        names = list(dict.fromkeys(name for s in samples for name in s.items))
        return cls(input_ids, labels, {name: _stack_items(samples, name) for name in names})


def _chunk(n: int, index: int, parts: int, what: str, parts_name: str) -> tuple[int, int]:
    """[start, end) of chunk `index` of `parts` equal chunks of n samples, or a clear error."""
    if parts < 1:
        raise ValueError(f"{parts_name} must be positive, got {parts}")
    if n % parts:
        raise ValueError(f"a batch of {n} samples does not split into {parts_name}={parts} equal parts; "
                         f"use a batch size divisible by {parts}")
    if not 0 <= index < parts:
        raise IndexError(f"{what} {index} is outside [0, {parts})")
    size = n // parts
    return index * size, (index + 1) * size


def _padded_length(samples: Sequence[Sample], seq_len: int | None) -> int:
    """The longest sample's length, or `seq_len` if every sample fits in it."""
    longest = max(s.input_ids.shape[0] for s in samples)
    if seq_len is None:
        return longest
    if longest > seq_len:
        raise ValueError(f"a sample has {longest} tokens, more than seq_len={seq_len}; raise seq_len to at least "
                         f"{longest} (collate never truncates: a cut could split a modality's token block)")
    return seq_len


def _pad(ids: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """`ids` right-padded with `value` to `length`."""
    return torch.cat([ids, ids.new_full((length - ids.shape[0],), value)])


def _stack_items(samples: Sequence[Sample], name: str) -> ModalityBatch:
    """One modality's items of all samples, stacked (or packed, with their grids) in sample order, with the
    per-sample counts."""
    present = [s.items[name] for s in samples if name in s.items]
    if any(name in s.item_grids for s in samples):
        grids = [s.item_grids[name] for s in samples if name in s.items]
        counts = torch.tensor([s.item_grids[name].shape[0] if name in s.items else 0 for s in samples])
        return ModalityBatch(torch.cat(present), counts, torch.cat(grids))
    shape = present[0].shape[1:]
    for t in present:
        if t.shape[1:] != shape:
            raise ValueError(f"modality {name!r}: items of shape {tuple(t.shape[1:])} and {tuple(shape)} "
                             f"in one batch; every item of a modality must have one shape")
    counts = torch.tensor([s.items[name].shape[0] if name in s.items else 0 for s in samples], dtype=torch.long)
    return ModalityBatch(torch.cat(present), counts)
