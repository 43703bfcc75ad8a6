"""Samples that cannot be trained on (a missing or corrupt image, a malformed conversation, one that does not fit).

A dataset raises `BadSample` from `__getitem__`; the batch builder applies `data.on_bad_sample` (skip: a
deterministic substitute takes the slot and the skip is recorded; error: stop naming the sample). The
records travel with the global batch (`MimoBatch.skipped`), because DataLoader workers build batches in
other processes, and the training loop counts them in `metrics.jsonl` and the final summary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkippedSample:
    """One sample left out of a batch: its dataset index, its source (file or image path) and why."""

    index: int
    path: str
    reason: str

    def describe(self) -> str:
        """One line naming the sample and the reason."""
        return f"sample {self.index} ({self.path}): {self.reason}"


class BadSample(ValueError):
    """Sample `index` (from `path`) cannot be trained on, for `reason`."""

    def __init__(self, index: int, path: str, reason: str) -> None:
        super().__init__(f"sample {index} ({path}): {reason}")
        self.record = SkippedSample(index, path, reason)
