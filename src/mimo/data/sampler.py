"""A deterministic, resumable sampler of global batches: the same indices on every rank, step after step.

DESIGN §3 "Batches": every rank sees the same global batch and slices its own samples from it, so the
sampler depends only on (dataset size, global batch size, seed, epoch, step) — never on the rank. Epoch e
is ordered by `torch.randperm` under `torch.Generator().manual_seed(seed + e)`; the position (epoch, step)
is the whole state, so a run resumed from `state_dict()` gets exactly the batches it would have had.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class GlobalBatchSampler:
    """An endless iterator of global batches (lists of dataset indices), epoch after epoch.

    `drop_last=True` drops an epoch's incomplete tail; `drop_last=False` completes the last batch with the
    first indices of the same epoch's order, so every batch has `global_batch_size` samples (which every
    module's DP size must divide)."""

    def __init__(
        self, dataset_size: int, global_batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        """Check the sizes and start at epoch 0, step 0."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if dataset_size < global_batch_size:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than one global batch of "
                             f"{global_batch_size}; use a global_batch_size <= {dataset_size} or a larger dataset")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.step = 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, that epoch's index order), cached

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch: the full ones, plus a completed tail when `drop_last` is False."""
        full, tail = divmod(self.dataset_size, self.global_batch_size)
        return full + (1 if tail and not self.drop_last else 0)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every dataset index in epoch `epoch`'s order: a permutation seeded by seed + epoch, or 0..n-1."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.dataset_size, generator=gen).tolist()
            else:
                order = list(range(self.dataset_size))
            self._order = (epoch, order)
        return self._order[1]

    def batch_at(self, epoch: int, step: int) -> list[int]:
        """The dataset indices of global batch `step` of epoch `epoch` (a pure function of the position)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside [0, {self.steps_per_epoch}) steps per epoch")
        order = self.epoch_order(epoch)
        start = step * self.global_batch_size
        batch = order[start : start + self.global_batch_size]
        return batch + order[: self.global_batch_size - len(batch)]

    def __iter__(self) -> Iterator[list[int]]:
        """The sampler itself: it continues from its current position."""
        return self

    def peek(self) -> list[int]:
        """The batch at the current position, without moving on (what `next` will return)."""
        return self.batch_at(self.epoch, self.step)

    def __next__(self) -> list[int]:
        """The batch at the current position; the position moves on before it is returned."""
        batch = self.peek()
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch, and the settings that must match when it is loaded."""
        return {"epoch": self.epoch, "step": self.step, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; settings that would change the batches are an error."""
        mismatched = {k: (v, state.get(k)) for k, v in self._settings().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (now, saved) in mismatched.items())
            raise ValueError(f"the sampler state was saved with other settings ({detail}); resuming would "
                             f"give different batches, so build the sampler with the saved settings")
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"saved position epoch {state['epoch']}, step {state['step']} is invalid for "
                             f"{self.steps_per_epoch} steps per epoch")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _settings(self) -> dict[str, Any]:
        """What fixes the sequence of batches, besides the position."""
        return {"dataset_size": self.dataset_size, "global_batch_size": self.global_batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last}
