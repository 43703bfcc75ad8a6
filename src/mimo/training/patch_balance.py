"""Images of different sizes encoded where the patches are even, their tokens delivered where their samples are.

A micro-batch's samples are split over an encoder's DP replicas in contiguous runs (DESIGN §3 "Batches"), and the
bridge carries each replica's samples' tokens in sample order. With native-resolution images that split leaves one
replica with the large images. Here the micro-batch's images are split by patch count instead
(`data.balance.split_by_patches`: every rank computes the same split from the host batch it holds), each replica
encodes its images, and one all-to-all over the encoder's DP group sends every image's tokens to the replica whose
samples own it, put back in batch order: the rows the bridge receives are exactly those of the contiguous split,
and the backward is the mirror all-to-all (each row's gradient back to the rank that encoded it). Exact: rows
move, nothing is summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo.data.balance import RankSplit, split_by_patches
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
        mine = self.split.images[self.rank]
        rows = batch.item_rows()
        starts = [0, *torch.cumsum(rows, 0).tolist()]
        pieces = [batch.items[starts[i]:starts[i + 1]] for i in mine]
        items = torch.cat(pieces) if pieces else batch.items[:0]
        return ModalityBatch(items, torch.ones(len(mine), dtype=torch.long), batch.item_grids[list(mine)])

    def _owner(self, image: int) -> int:
        """The replica whose samples hold `image`."""
        return next(q for q, (lo, hi) in enumerate(self.owned) if lo <= image < hi)

    def _sent(self, rank: int) -> list[list[int]]:
        """The images `rank` encodes, grouped by the replica they go to (each group in batch order)."""
        groups: list[list[int]] = [[] for _ in self.owned]
        for image in self.split.images[rank]:
            groups[self._owner(image)].append(image)
        return groups

    def exchange(self, rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """This rank's encoded rows (its images' tokens in batch order) → the rows of its own samples' images in
        batch order, as the contiguous split would have encoded them."""
        sent = [self._sent(r) for r in range(len(self.owned))]  # every rank's, as every rank computes them
        send = [sum(self.tokens[i] for i in images) for images in sent[self.rank]]
        arrived = [image for groups in sent for image in groups[self.rank]]  # in the order they arrive
        recv = [sum(self.tokens[i] for i in groups[self.rank]) for groups in sent]
        moved = _AllToAll.apply(rows, send, recv, group)
        return moved.index_select(0, self._batch_order(arrived, moved.device))

    def _batch_order(self, arrived: list[int], device: torch.device) -> torch.Tensor:
        """For each row of this replica's images in batch order, where it sits among the rows as they arrived."""
        at, offset = {}, 0
        for image in arrived:
            at[image] = offset
            offset += self.tokens[image]
        lo, hi = self.owned[self.rank]
        order = [at[i] + j for i in range(lo, hi) for j in range(self.tokens[i])]
        return torch.tensor(order, dtype=torch.long).to(device, non_blocking=True)


def split_images(batch: ModalityBatch, ranks: int) -> RankSplit:
    """A micro-batch's packed images over `ranks` encoder replicas by patch count (the same on every rank)."""
    return split_by_patches(batch.item_rows().tolist(), ranks)


def step_imbalance(splits: list[RankSplit]) -> float:
    """A step's max / mean patches per rank, weighted as the encoder waits: the sum over micro-batches of the
    busiest rank's patches over the sum of the mean's (1.0: even)."""
    busiest = sum(max(s.patches) for s in splits)
    mean = sum(sum(s.patches) / len(s.patches) for s in splits)
    return busiest / mean if mean else 1.0


class _AllToAll(torch.autograd.Function):
    """Rows [n, ...] sent in runs of `send` rows to each rank of `group`, `recv` rows from each; the backward
    sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], recv: list[int],  # noqa: ANN001 - autograd's ctx
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None
