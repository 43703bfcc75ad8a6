"""Images of different sizes encoded where the patches are even, their tokens delivered where their samples are.

A micro-batch's samples are split over an encoder's DP replicas in contiguous runs (DESIGN §3 "Batches"), and the
bridge carries each replica's samples' tokens in sample order. With native-resolution images that split leaves one
replica with the large images. Here the micro-batch's images are split by patch count instead
(`data.balance.split_by_patches`: every rank computes the same split from the host batch it holds), each replica
encodes its images, and one all-to-all over the encoder's DP group sends every image's tokens to the replica whose
samples own it, put back in batch order: the rows the bridge receives are exactly those of the contiguous split,
and the backward is the mirror all-to-all (each row's gradient back to the rank that encoded it). Exact: rows
move, nothing is summed (`mimo.exchange.RowRoute`). A homogeneous encoder under context parallelism splits each
replica's images over its CP ranks instead (`split_replicas`) and routes every CP rank the rows its sequence chunks
hold (`chunk_route`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo.data.balance import RankSplit, split_by_patches
from mimo.exchange import RowRoute
from mimo.models import ModalityBatch


@dataclass(frozen=True)
class PatchBalance:
    """One micro-batch's images over `ranks` encoder replicas: which this `rank` encodes, and the all-to-all that
    returns every image's tokens to the replica owning its sample."""

    split: RankSplit  # images (indices into the micro-batch's) each rank encodes, by patches
    owned: tuple[tuple[int, int], ...]  # each replica's images [first, last): those of its contiguous samples
    tokens: tuple[int, ...]  # tokens each image of the micro-batch gives
    rank: int

    @classmethod
    def plan(cls, batch: ModalityBatch, tokens: torch.Tensor, split: RankSplit, rank: int) -> PatchBalance:
        """Micro-batch `batch`'s packed images (`tokens` [N] per image) encoded as `split` says (`split_images`)."""
        ranks = len(split.images)
        per = batch.items_per_sample.shape[0] // ranks  # samples per replica (`MimoBatch.shard`)
        first = [0, *torch.cumsum(batch.items_per_sample, 0).tolist()]  # each sample's first image
        owned = tuple((first[q * per], first[(q + 1) * per]) for q in range(ranks))
        return cls(split, owned, tuple(tokens.tolist()), rank)

    def items(self, batch: ModalityBatch) -> ModalityBatch:
        """The images this rank encodes (one per "sample": the encoder reads only rows and grids)."""
        return images_of(batch, self.split.images[self.rank])

    def exchange(self, rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """This rank's encoded rows (its images' tokens in batch order) → the rows of its own samples' images in
        batch order, as the contiguous split would have encoded them (rows numbered over the micro-batch)."""
        offsets = [0, *itertools.accumulate(self.tokens)]
        held = [image_rows(offsets, images) for images in self.split.images]
        needed = [torch.arange(offsets[lo], offsets[hi]) for lo, hi in self.owned]
        return RowRoute.plan(held, needed, self.rank, rows.device)(rows, group)


def image_rows(offsets: Sequence[int], images: Sequence[int]) -> torch.Tensor:
    """The row numbers of these images' tokens, one image after another (`offsets`: each image's first row)."""
    if not images:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in images])


def images_of(batch: ModalityBatch, images: Sequence[int]) -> ModalityBatch:
    """Those images of `batch` (indices, in order), one per "sample": the encoder reads only rows and grids."""
    starts = [0, *torch.cumsum(batch.item_rows(), 0).tolist()]
    pieces = [batch.items[starts[i]:starts[i + 1]] for i in images]
    items = torch.cat(pieces) if pieces else batch.items[:0]
    grids = None if batch.item_grids is None else batch.item_grids[list(images)]
    return ModalityBatch(items, torch.ones(len(images), dtype=torch.long), grids)


def split_replicas(batch: ModalityBatch, replicas: int, ranks: int) -> RankSplit:
    """Each of `replicas` replicas' images (those of its contiguous samples, as `MimoBatch.shard` cuts them) over its
    own `ranks` ranks by patch count: one split over replicas·ranks ranks, replica-major, indices the micro-batch's
    (a homogeneous encoder's CP ranks: each replica's rows stay in the replica)."""
    per = batch.items_per_sample.shape[0] // replicas
    first = [0, *torch.cumsum(batch.items_per_sample, 0).tolist()]
    patches = batch.item_rows().tolist()
    images, loads = [], []
    for q in range(replicas):
        lo, hi = first[q * per], first[(q + 1) * per]
        part = split_by_patches(patches[lo:hi], ranks)
        images += [tuple(lo + i for i in group) for group in part.images]
        loads += part.patches
    return RankSplit(tuple(images), tuple(loads))


def chunk_route(tokens: torch.Tensor, groups: Sequence[Sequence[int]], first_image: int,
                needed: Sequence[torch.Tensor], rank: int, device: torch.device | str) -> RowRoute:
    """CP rank c of a replica encodes images `groups[c]` (the micro-batch's indices, `tokens` [N] rows each; the
    replica's images start at `first_image`) and needs the replica's rows its chunks hold (`needed[c]`,
    `ContextText.every_rank_rows`): the exchange over the replica's CP group that gives each CP rank only those."""
    offsets = [0, *torch.cumsum(tokens, 0).tolist()]
    held = [image_rows(offsets, group) - offsets[first_image] for group in groups]
    return RowRoute.plan(held, needed, rank, device)


def split_images(batch: ModalityBatch, ranks: int) -> RankSplit:
    """A micro-batch's packed images over `ranks` encoder replicas by patch count (the same on every rank)."""
    return split_by_patches(batch.item_rows().tolist(), ranks)


def step_imbalance(splits: list[RankSplit]) -> float:
    """A step's max / mean patches per rank, weighted as the encoder waits: the sum over micro-batches of the
    busiest rank's patches over the sum of the mean's (1.0: even)."""
    busiest = sum(max(s.patches) for s in splits)
    mean = sum(sum(s.patches) / len(s.patches) for s in splits)
    return busiest / mean if mean else 1.0
