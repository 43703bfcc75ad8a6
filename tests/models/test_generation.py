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


def _mixed_batch(seed: int = 0):
    """An untrained tiny LLaVA and three prompts of different lengths with 1, 0 and 3 images, images anywhere."""
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    image, tokens = provider.image_token_id, provider.vision_config.tokens_per_image

    def text(n: int) -> list[int]:
        return torch.randint(1, 200, (n,), generator=gen).tolist()

    prompts = [text(2) + [image] * tokens + text(5), text(9), text(1) + [image] * tokens + text(3) + [image] * tokens
               + [image] * tokens + text(2)]
    counts = torch.tensor([1, 0, 3])
    size = provider.vision_config.image_size
    pixels = torch.randn(int(counts.sum()), 3, size, size, generator=gen, dtype=torch.float64)
    return provider.provide().eval(), prompts, pixels, counts


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[7] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def test_the_kv_cache_decodes_padded_batches_with_many_images_as_each_row_alone_without_it():
    """The cached decoder on a left-padded batch (1, 0 and 3 images a row) generates, token for token, what the
    uncached reference generates for each row alone, and what the uncached decoder generates for the padded batch."""
    model, prompts, pixels, counts = _mixed_batch()
    ids, mask = _left_padded(prompts)
    batch = {"images": ModalityBatch(pixels, counts)}
    cached = greedy_decode(model, ids, batch, 12, prompt_mask=mask)
    assert cached.shape == (3, 12)
    assert torch.equal(greedy_decode(model, ids, batch, 12, prompt_mask=mask, use_cache=False), cached)
    first = 0
    for row, (prompt, count) in enumerate(zip(prompts, counts.tolist(), strict=True)):
        alone = {"images": ModalityBatch(pixels[first:first + count], torch.tensor([count]))}
        first += count
        assert greedy_decode(model, torch.tensor([prompt]), alone, 12, use_cache=False)[0].tolist() == \
            cached[row].tolist()
    assert len({tuple(r) for r in cached.tolist()}) == 3  # different continuations: the rows are not confused


def test_the_kv_cache_stops_at_end_of_sequence_as_the_reference_does():
    model, prompts, pixels, counts = _mixed_batch(seed=1)
    ids, mask = _left_padded(prompts)
    batch = {"images": ModalityBatch(pixels, counts)}
    free = greedy_decode(model, ids, batch, 6, prompt_mask=mask).tolist()
    eos = [free[0][2], free[1][0]]  # row 0 ends at its third token, row 1 at its first; row 2 may run on
    want = greedy_decode(model, ids, batch, 6, eos, prompt_mask=mask, use_cache=False)
    assert torch.equal(greedy_decode(model, ids, batch, 6, eos, prompt_mask=mask), want)
