"""Held-out evaluation: greedy generation and the held-out answers built on it."""

from __future__ import annotations

import json

import torch

from mimo.data import DigitsDataset
from mimo.data.digits_llava import digits_llava_files
from mimo.families.family import EvalRequest
from mimo.families.llava import IMAGES, LLAVA, LlavaMimoProvider
from mimo.models import ModalityBatch
from mimo.models.generation import greedy_decode
from mimo.training.evaluate import answer_questions
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


def test_held_out_answers_in_batches_equal_one_sample_at_a_time(tmp_path, monkeypatch):
    # 30 held-out digits through the LLaVA files, answered in batches of 12 (the last one short) and one by one with
    # the uncached reference decoder; an untrained model, so the answers are whatever it says, compared as ids
    monkeypatch.setenv("MIMO_CACHE_DIR", str(tmp_path))
    files = digits_llava_files()
    subset = tmp_path / "held_out_30.json"
    subset.write_text(json.dumps(json.loads((files / "held_out.json").read_text())[:30]))
    config = parse_run_config({"parallelism": {"images": {"data_parallel_size": 1},
                                               "language": {"data_parallel_size": 1}},
                               "train": {"dtype": "float64"}})
    plan = plan_model(config)
    provider = plan.whole_model_provider()
    model = provider.provide()
    held_out = LLAVA.questions(config.model, plan.opened, provider, EvalRequest(subset, data=config.data),
                               torch.float64)
    eos = held_out.eos_ids
    answers = answer_questions(model, held_out, max_new_tokens=3, batch_size=12)
    assert len(answers.answers) == 30 and not answers.skipped
    said = set()
    for index, answer in enumerate(answers.answers):
        question = held_out.dataset.question(index)
        images = ModalityBatch(question.items["images"], torch.ones(1, dtype=torch.long))
        alone = greedy_decode(model, torch.tensor([question.input_ids]), {"images": images}, 3, eos,
                              use_cache=False)[0].tolist()
        alone = alone[:alone.index(eos[0]) + 1] if eos[0] in alone else alone
        assert answer.answer == held_out.decode(alone) and answer.reference == data_reference(files, index)
        said.add(tuple(alone))
    assert len(said) > 1  # per-scan ids, not one answer for every image


def data_reference(files, index: int) -> str:
    return json.loads((files / "held_out.json").read_text())[index]["conversations"][1]["value"]
