"""The one greedy decoder: argmax tokens, stopping once every row has reached an end-of-sequence id (kept)."""

from __future__ import annotations

import torch

from mimo.data import DigitsDataset
from mimo.families.llava import IMAGES, LlavaMimoProvider
from mimo.models import ModalityBatch
from mimo.models.generation import greedy_decode


def _prompts(n: int):
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    data = DigitsDataset(IMAGES, "held_out", image_token_id=provider.image_token_id, dtype=torch.float64)
    prompts = torch.stack([data.prompt_for_generation(i) for i in range(n)])
    images = ModalityBatch(torch.stack([data.image(i) for i in range(n)]), torch.ones(n, dtype=torch.long))
    return provider.provide().eval(), prompts, {"images": images}


def test_generation_stops_once_every_row_has_ended():
    model, prompts, images = _prompts(2)
    free = greedy_decode(model, prompts, images, 4)
    assert free.shape == (2, 4)
    first = int(free[0, 0])
    alone = greedy_decode(model, prompts[:1], {"images": ModalityBatch(images["images"].items[:1],
                                                                       torch.ones(1, dtype=torch.long))}, 4, [first])
    assert alone.tolist() == [[first]]  # the end-of-sequence id is kept, nothing after it
    both = greedy_decode(model, prompts, images, 4, [first])
    ends = [row.index(first) + 1 if first in row else 4 for row in free.tolist()]
    assert torch.equal(both, free[:, :max(ends)])  # a row that ended goes on until the last has
