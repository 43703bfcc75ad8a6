"""Rows moved between the ranks of a group in one all-to-all: each rank sends every other only the rows it needs.

`RowRoute.plan` decides on the host, from which rows every rank holds and which every rank needs (every rank
computes the same from the batch it holds: no communication), which of this rank's rows go where and where each
arriving row belongs. Calling the route moves them with one `dist.all_to_all_single` (`all_to_all_rows`), whose
backward is the mirror exchange: each row's gradient goes back to the rank that sent it (summed there where one row
went to several ranks). Exact: rows move, nothing else is summed. Used where an encoder's rows are encoded on one set
of ranks and needed, row by row, on another (patch balance, context parallelism's chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo.models.transfer import to_device


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


def all_to_all_rows(rows: torch.Tensor, send: list[int], recv: list[int],
                    group: dist.ProcessGroup | None) -> torch.Tensor:
    """`rows` sent in runs of `send[r]` rows to group rank r, `recv[r]` rows received from each, joined in rank
    order (differentiable: the backward is the mirror exchange)."""
    return _AllToAll.apply(rows, list(send), list(recv), group)


@dataclass(frozen=True)
class RowRoute:
    """This rank's part of one exchange: which of its rows it sends to each rank, and where each row it needs sits
    among those that arrive."""

    send_index: torch.Tensor  # rows of this rank's block, grouped by destination (rank order)
    send: tuple[int, ...]  # rows sent to each group rank
    recv: tuple[int, ...]  # rows received from each group rank
    order: torch.Tensor  # for each row this rank needs (in its order), its place among the arrived rows

    @classmethod
    def plan(cls, held: Sequence[torch.Tensor], needed: Sequence[torch.Tensor], rank: int,
             device: torch.device | str = "cpu") -> RowRoute:
        """Group rank r holds rows numbered `held[r]` (its block's order; each row held by one rank), rank q needs
        rows `needed[q]` (in the order it wants them; several ranks may need one row). Only what concerns `rank`
        must be right: its own entries, and `needed` of every rank that needs a row `rank` holds, `held` of every
        rank that holds a row `rank` needs (others may be empty)."""
        total = 1 + max((int(t.max()) for t in (*held, *needed) if t.numel()), default=-1)
        holder = torch.full((total,), -1, dtype=torch.long)
        slot = torch.zeros(total, dtype=torch.long)
        for r, rows in enumerate(held):
            holder[rows] = r
            slot[rows] = torch.arange(rows.numel())
        mine = needed[rank]
        source = holder[mine]
        if (source < 0).any():
            raise ValueError(f"rows {mine[source < 0].tolist()} needed by rank {rank} are held by no rank")
        arrival = torch.sort(source, stable=True).indices  # rows arrive grouped by sender, each group in order
        order = torch.empty_like(arrival)
        order[arrival] = torch.arange(arrival.numel())
        sends = [slot[rows[holder[rows] == rank]] for rows in needed]
        recv = torch.bincount(source, minlength=len(held)).tolist()
        return cls(to_device(torch.cat(sends), device), tuple(s.numel() for s in sends), tuple(recv),
                   to_device(order, device))

    def __call__(self, rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """This rank's block [n, ...] (rows as `held` numbers them) → the rows it needs, in `needed`'s order."""
        moved = all_to_all_rows(rows.index_select(0, self.send_index), self.send, self.recv, group)
        return moved.index_select(0, self.order)

