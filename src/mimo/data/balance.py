"""Split a batch's images across the vision encoder's data-parallel ranks by patch count, not image count.

At native resolution an image costs the tower in proportion to its patches (a 1280-px image is ~25× a 256-px
one), so handing each rank the same number of images leaves the rank with the large ones the straggler. The
patch split is greedy largest-first (LPT): images by decreasing patches, each to the least-loaded rank (ties:
the earlier image, the lower rank), then each rank's images back in batch order. LPT is within 4/3 of the best
split of the largest load, and near-even when a batch has many more images than ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RankSplit:
    """Which images (indices into the batch, in batch order) each rank encodes, and its patches."""

    images: tuple[tuple[int, ...], ...]
    patches: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max / mean patches per rank: 1.0 is even; the step waits for the max."""
        mean = sum(self.patches) / len(self.patches)
        return max(self.patches) / mean if mean else 1.0


def _split(patches: Sequence[int], groups: list[list[int]]) -> RankSplit:
    """The split of these image groups, each in batch order, with its patch loads."""
    ordered = tuple(tuple(sorted(group)) for group in groups)
    return RankSplit(ordered, tuple(sum(patches[i] for i in group) for group in ordered))


def _check(patches: Sequence[int], ranks: int) -> None:
    """One line for an impossible request: no ranks, or a negative patch count."""
    if ranks < 1:
        raise ValueError(f"cannot split images over {ranks} ranks; need at least 1")
    bad = [p for p in patches if p < 0]
    if bad:
        raise ValueError(f"patch counts must be non-negative, got {bad[0]}")


def split_by_patches(patches: Sequence[int], ranks: int) -> RankSplit:
    """Images of these patch counts over `ranks`: greedy largest-first into the least-loaded rank."""
    _check(patches, ranks)
    groups: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        groups[rank].append(i)
        loads[rank] += patches[i]
    return _split(patches, groups)


def split_by_count(patches: Sequence[int], ranks: int) -> RankSplit:
    """The image-count split a plain data-parallel sampler makes: contiguous runs of (nearly) equal length."""
    _check(patches, ranks)
    n = len(patches)
    bounds = [r * n // ranks for r in range(ranks + 1)]
    return _split(patches, [list(range(bounds[r], bounds[r + 1])) for r in range(ranks)])
