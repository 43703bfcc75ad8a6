"""Held-out evaluation: greedy generation and the answer accuracy built on it."""

from __future__ import annotations

import json

import torch

from mimo.data import DigitsDataset
from mimo.data.digits_llava import DIGITS_TOKENIZER, digits_llava_files
from mimo.families.llava import IMAGES, LlavaMimoProvider
from mimo.models import ModalityBatch
from mimo.models.generation import greedy_decode
from mimo.training.evaluate import answer_accuracy
from mimo.training.plan import plan_model
from mimo.training.run_config import parse_run_config


def test_greedy_generation_appends_the_argmax_tokens():
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    model = provider.provide().eval()
    data = DigitsDataset(IMAGES, "held_out", image_token_id=provider.image_token_id, dtype=torch.float64)
    prompts = torch.stack([data.prompt_for_generation(i) for i in range(3)])
    images = ModalityBatch(torch.stack([data.image(i) for i in range(3)]), torch.ones(3, dtype=torch.long))
    generated = greedy_decode(model, prompts, {"images": images}, max_new_tokens=2)
    ids = prompts
    for _ in range(2):  # the same thing by hand, one full forward per token
        emb = model.align_embeddings(ids, model.encode({"images": images}), model.tokens_per_sample({"images": images}))
        ids = torch.cat([ids, model.language_logits(emb)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, prompts.shape[1]:])


def test_answer_accuracy_in_batches_equals_one_sample_at_a_time(tmp_path, monkeypatch):
    # 30 held-out digits through the LLaVA files; an untrained model scores near 0 either way, so compare what
    # it generates sample by sample with what the batched count scored
    monkeypatch.setenv("MIMO_CACHE_DIR", str(tmp_path))
    files = digits_llava_files()
    subset = tmp_path / "held_out_30.json"
    subset.write_text(json.dumps(json.loads((files / "held_out.json").read_text())[:30]))
    config = parse_run_config({"parallelism": {"images": {"data_parallel_size": 1},
                                               "language": {"data_parallel_size": 1}},
                               "train": {"dtype": "float64"},
                               "data": {"name": "llava", "path": str(subset), "image_folder": str(files / "images"),
                                        "tokenizer": str(DIGITS_TOKENIZER)}})
    provider = plan_model(config).whole_model_provider()
    model = provider.provide()
    data = plan_model(config).dataset(provider)
    accuracy = answer_accuracy(model, data, batch_size=12)  # 3 batches, the last one short
    hits, words = 0, set()
    for i in range(len(data)):
        sample = data[i]
        images = ModalityBatch(sample.items["images"], torch.ones(1, dtype=torch.long))
        prompt = sample.input_ids[:-2]  # <bos> <image x16> which digit ?
        generated = greedy_decode(model, prompt[None], {"images": images}, 2)[0]
        hits += torch.equal(generated, sample.input_ids[-2:])
        words.add(int(generated[0]))
    assert len(words) > 1  # per-digit words, not one word for every image
    assert accuracy == hits / len(data)
