"""Modalities whose items differ in size (native-resolution images): packed rows with per-item grids go through
`ModalitySubmodule` and `MimoModel` with per-sample token counts from the encoder's `tokens_of`."""

from __future__ import annotations

import torch
from torch import nn

from mimo.models import Decoder, DecoderConfig, MimoModel, ModalityBatch, ModalitySubmodule

H, D = 8, 4


class RowPairEncoder(nn.Module):
    """A test encoder of packed items: each row mapped, then each item's rows averaged in pairs (one token per 2
    rows) plus the item's mean, so tokens depend on their item's other rows and item boundaries matter."""

    smallest_grid = torch.tensor([1, 1, 2])

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, H, dtype=torch.float64)

    def tokens_of(self, grids: torch.Tensor) -> torch.Tensor:
        return grids.prod(dim=1) // 2

    def forward(self, rows: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        out = []
        for item in self.proj(rows).split(grids.prod(dim=1).tolist()):
            out.append(item.view(-1, 2, H).mean(1) + item.mean(0))
        return torch.cat(out)


def _model() -> MimoModel:
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=16, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=1,
                                    ffn_hidden_size=16)).double()
    return MimoModel(decoder, {"images": ModalitySubmodule(RowPairEncoder(), nn.Identity())}, {"images": 15})


def _batch() -> tuple[torch.Tensor, ModalityBatch]:
    """Two samples: the first with items of 4 and 6 rows (2 + 3 tokens), the second with none."""
    ids = torch.tensor([[1, 15, 15, 2, 15, 15, 15, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
    grids = torch.tensor([[1, 2, 2], [1, 2, 3]])
    return ids, ModalityBatch(torch.randn(10, D, dtype=torch.float64), torch.tensor([2, 0]), grids)


def test_packed_items_give_each_sample_its_items_tokens_and_train():
    model, (ids, items) = _model(), _batch()
    assert model.tokens_per_sample({"images": items})["images"].tolist() == [5, 0]
    loss, count = model(ids, ids, {"images": items})
    loss.backward()
    assert count > 0 and model.modality_submodules["images"].encoder.proj.weight.grad.abs().sum() > 0


def test_packed_items_are_encoded_per_item_not_as_one_stack():
    """Item boundaries come from the grids: the same rows cut differently give other embeddings."""
    model, (_, items) = _model(), _batch()
    sub = model.modality_submodules["images"]
    other = torch.tensor([[1, 2, 3], [1, 2, 2]])  # 6 + 4 rows instead of 4 + 6
    assert not torch.allclose(sub(items.items, items.item_grids), sub(items.items, other))


def test_no_packed_items_encode_the_smallest_item_and_keep_no_rows():
    sub = _model().modality_submodules["images"]
    out = sub(torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, H)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in sub.parameters())
