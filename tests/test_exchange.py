"""`mimo.exchange.RowRoute`: the plan of one all-to-all that gives every rank exactly the rows it needs."""

from __future__ import annotations

import pytest
import torch

from mimo.exchange import RowRoute


def rows(*numbers: int) -> torch.Tensor:
    return torch.tensor(numbers, dtype=torch.long)


def test_every_rank_gets_the_rows_it_needs_in_its_order():
    """Three ranks (one holds nothing, one needs nothing, one row needed twice): the all-to-all played on the host
    (each rank's runs joined in rank order) brings every rank its rows in the order it asked for them."""
    held = [rows(4, 0, 7), rows(), rows(1, 2, 3, 5, 6)]
    needed = [rows(7, 1, 4), rows(6, 0, 1, 2, 3, 4, 5, 7, 1), rows()]
    routes = [RowRoute.plan(held, needed, r) for r in range(3)]
    blocks = [h.double().unsqueeze(1) for h in held]  # each row's value is its number
    for q in range(3):
        runs = [blocks[r].index_select(0, routes[r].send_index).split(list(routes[r].send))[q] for r in range(3)]
        assert [run.shape[0] for run in runs] == list(routes[q].recv)
        got = torch.cat(runs).index_select(0, routes[q].order)
        assert got.squeeze(1).long().tolist() == needed[q].tolist()


def test_a_needed_row_nobody_holds_is_one_line():
    with pytest.raises(ValueError, match=r"^rows \[9\] needed by rank 1 are held by no rank$"):
        RowRoute.plan([rows(0, 1), rows(2)], [rows(0), rows(2, 9)], 1)
