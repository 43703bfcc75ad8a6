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


def test_a_generated_image_token_is_text():
    """A model that emits its image token (transformers' LLaVA generates on) goes on generating: the generated id
    is embedded as a token, no image embedding is looked for there. Image id 0 and a zero output head make every
    logit 0, so argmax emits the image token at every step."""
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64, image_token_id=0)
    model = provider.provide().eval()
    with torch.no_grad():
        model.language_model.lm_head.weight.zero_()
    vision = provider.vision_config
    prompt = torch.tensor([[1] + [0] * vision.tokens_per_image + [5, 6]])
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=torch.float64)
    images = {"images": ModalityBatch(pixels, torch.ones(1, dtype=torch.long))}
    assert greedy_decode(model, prompt, images, 3).tolist() == [[0, 0, 0]]
