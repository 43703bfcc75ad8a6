"""Held-out answers during training (`eval.generate`, on by default for the digits): every `eval.interval` steps and
at the end the run answers the held-out questions by `mimo eval`'s path, so `mimo eval` on the digits' held-out
split reproduces the run's reported scores exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mimo.data.digits_llava import digits_llava_files
from mimo.training.run_config import RunConfigError, parse_run_config
from mimo.training.scores import scores
from tests.test_train_cli import in_process, metrics, mimo, write_config

ONE_RANK = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}


def test_mimo_eval_on_the_digits_held_out_split_reproduces_the_run_s_scores(tmp_path):
    # 20 steps at a high learning rate: the model answers with a digit word (one for most scans), so the scores are
    # not all zero; 4 new tokens at most, as the run's eval.max_new_tokens
    path, run_dir = write_config(tmp_path, model={"preset": "tiny"}, parallelism=ONE_RANK,
                                 train={"steps": 20, "global_batch_size": 16, "num_microbatches": 1, "lr": 0.01,
                                        "dtype": "float32"},
                                 data={"name": "digits", "cache_samples": True, "num_workers": 0},
                                 checkpoint={"interval": 10}, eval={"interval": 10, "max_new_tokens": 4})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [m for m in metrics(run_dir) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [10, 20]
    assert all({"loss", "exact_match", "token_accuracy"} <= set(m) for m in evals)
    last = evals[-1]
    assert last["exact_match"] > 0
    held_out, answers = digits_llava_files() / "held_out.json", tmp_path / "answers.jsonl"
    done_eval = in_process("eval", str(run_dir / "checkpoints" / "step_00000020"), "--data", str(held_out),
                           "--max-new-tokens", "4", "--out", str(answers), "--device", "cpu")
    assert done_eval.returncode == 0, done_eval.stderr
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(records) == 297
    assert scores([(r["answer"], r["reference"]) for r in records]) == \
        {"exact_match": last["exact_match"], "token_accuracy": last["token_accuracy"]}
    said = f"exact match {last['exact_match']:.1%}, token accuracy {last['token_accuracy']:.1%}"
    assert f"held-out answers at step 20: {said} (297 questions of the digits' held-out split)" in done.stdout
    assert done_eval.stdout.startswith(f"{said} (297 questions of {held_out})")


def test_eval_generate_needs_held_out_questions():
    with pytest.raises(RunConfigError, match=r"^eval.generate: true answers held-out questions, and this run has "
                                             r"none"):
        parse_run_config({"parallelism": ONE_RANK, "data": {"name": "synthetic"}, "eval": {"generate": True}})
    assert parse_run_config({"parallelism": ONE_RANK}).answers_held_out  # the digits answer by default
    assert not parse_run_config({"parallelism": ONE_RANK, "eval": {"generate": False}}).answers_held_out


@pytest.mark.parametrize("template", ["chat", "vicuna_v1", "plain"])
def test_generate_prompts_a_run_as_mimo_eval_asks_its_questions(tmp_path, template):
    """`mimo generate` of a run trained with any data.template builds the prompt ids a held-out question of that
    run gets (the turn rendered by the run's template up to its answer), so their answers can be the same."""
    from mimo.families.family import EvalRequest, GenerationRequest
    from mimo.families.llava import LLAVA, serve
    from mimo.training.plan import plan_model
    from tests.data.llava_files import save_entries, save_image, save_tokenizer

    image = save_image(tmp_path / "images" / "a.png")
    text = "look at this <image> what is it"
    data = {"name": "llava", "path": str(save_entries(tmp_path / "d.json", [{"image": "a.png", "conversations": [
        {"from": "human", "value": text}, {"from": "gpt", "value": "a cat"}]}])),
        "image_folder": str(tmp_path / "images"), "template": template,
        "tokenizer": str(save_tokenizer(tmp_path / "tokenizer"))}
    config = parse_run_config({"parallelism": ONE_RANK, "data": data})
    plan = plan_model(config)
    provider = plan.whole_model_provider()
    held_out = LLAVA.questions(config.model, plan.opened, provider, EvalRequest(tmp_path / "d.json", data=config.data),
                               torch.float32)
    question = held_out.dataset.question(0)
    asked = serve.prompt(config.model, provider, GenerationRequest((image,), text, 4, config.data))
    assert asked.input_ids == question.input_ids
    words = held_out.dataset.prompter.decode(question.input_ids)
    assert ("USER: look at this" in words) == (template == "vicuna_v1") and ("look" in words) == (template != "plain")


def test_a_family_that_cannot_answer_is_refused_before_launch(tmp_path):
    """Qwen-VL has no `questions` hook (yet): eval.generate: true is one line from plan_run, not a failure at the
    end of the run."""
    from mimo.training.plan import plan_run

    held_out = tmp_path / "held_out.json"
    held_out.write_text("[]")
    config = parse_run_config({"model": {"family": "qwen_vl"}, "parallelism": ONE_RANK,
                               "data": {"name": "llava", "path": str(held_out), "image_folder": str(tmp_path)},
                               "eval": {"path": str(held_out), "generate": True}})
    with pytest.raises(RunConfigError, match=r"^eval.generate: the qwen_vl family cannot answer held-out questions"):
        plan_run(config, 1)
