"""Held-out evaluation: greedy generation and the digits caption accuracy built on it."""

from __future__ import annotations

import torch

from mimo.data import DigitsDataset
from mimo.models import ModalityBatch
from mimo.provider import LlavaMimoProvider
from mimo.training.evaluate import digits_accuracy, greedy_generate


def test_greedy_generation_appends_the_argmax_tokens():
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    model = provider.provide().eval()
    data = DigitsDataset("held_out", image_token_id=provider.image_token_id, dtype=torch.float64)
    prompts = torch.stack([data.prompt_for_generation(i) for i in range(3)])
    images = ModalityBatch(torch.stack([data.image(i) for i in range(3)]), torch.ones(3, dtype=torch.long))
    generated = greedy_generate(model, prompts, {"images": images}, max_new_tokens=2)
    ids = prompts
    for _ in range(2):  # the same thing by hand, one full forward per token
        emb = model.align_embeddings(ids, model.encode({"images": images}), model.tokens_per_sample({"images": images}))
        ids = torch.cat([ids, model.language_logits(emb)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, prompts.shape[1]:])


def test_digits_accuracy_in_batches_equals_one_digit_at_a_time(monkeypatch):
    # the untrained model scores 0 either way, so compare the words it generates, not only the accuracy
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    model = provider.provide()
    data = DigitsDataset("held_out", image_token_id=provider.image_token_id, dtype=torch.float64)
    scored = []
    score = data.caption_accuracy
    monkeypatch.setattr(data, "caption_accuracy", lambda words, indices: scored.append(words) or score(words, indices))
    accuracy = digits_accuracy(model, data, batch_size=100)  # 3 batches, the last one short
    words = []
    for i in range(len(data)):
        batch = {"images": ModalityBatch(data.image(i)[None], torch.ones(1, dtype=torch.long))}
        words.append(data.tokenizer.decode(greedy_generate(model, data.prompt_for_generation(i)[None], batch, 1)[0]))
    assert scored == [words] and len(set(words)) > 1  # per-digit words, not one word for every image
    assert accuracy == score(words, list(range(len(data))))
