"""`data: {name: llava, ...}` in a run: each bad data section is one line before any worker starts, the
tokenizer and image processing come from the model's Hugging Face directory, and `mimo train` trains from a
LLaVA JSON and a PNG folder, skipping a bad sample (or, with on_bad_sample error, stops naming it)."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from mimo.cli import _checkpoint_model, main
from mimo.training.evaluate import held_out_loss
from mimo.training.plan import plan_model, plan_run
from mimo.training.run_config import RunConfigError, parse_run_config
from tests.data.llava_files import CHATML, pretrain_entry, save_entries, save_image, save_tokenizer
from tests.test_train_cli import metrics, mimo, write_config

LAYOUT = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def llava_files(tmp_path, chat_template: str | None = CHATML, entries: list | None = None) -> dict:
    """A data section over a JSON file, an image folder of 8×8 PNGs and a word-level tokenizer."""
    for k in range(4):
        save_image(tmp_path / "images" / f"{k}.png", seed=k)
    entries = entries or [pretrain_entry(f"{k}.png", ["a cat", "a dog"][k % 2]) for k in range(4)]
    return {"name": "llava", "path": str(save_entries(tmp_path / "data.json", entries)),
            "image_folder": str(tmp_path / "images"),
            "tokenizer": str(save_tokenizer(tmp_path / "tokenizer", chat_template))}


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "llava"}, "data: name 'llava' needs data.path and data.image_folder"),
    ({"name": "llava", "path": "x.json"}, "data: name 'llava' needs data.image_folder"),
    ({"name": "llava", "path": "x.json", "image_folder": "i", "template": "llama_2"},
     "data.template: 'llama_2' is not allowed; choose one of ['chat', 'plain', 'vicuna_v1']"),
    ({"on_bad_sample": "ignore"}, "data.on_bad_sample: 'ignore' is not allowed; choose one of ['skip', 'error']"),
    ({"max_seq_len": 0}, "data.max_seq_len: must be >= 1, got 0"),
    ({"name": "digits", "path": "x.json", "template": "plain"},
     "data: data.path, data.template apply to name 'llava' only, and name is 'digits'"),
])


def test_bad_data_sections_fail_at_parse(data, message):
    with pytest.raises(RunConfigError, match=f"^{re.escape(message)}"):
        parse_run_config({"parallelism": LAYOUT, "data": data})


@pytest.mark.parametrize(("change", "message"), [
    (lambda d, t: {**d, "path": str(t / "missing.json")}, "data.path: {t}/missing.json is not a file"),
    (lambda d, t: {**d, "image_folder": str(t / "data.json")}, "data.image_folder: {t}/data.json is not a directory"),
    (lambda d, t: {k: v for k, v in d.items() if k != "tokenizer"},
     "data.tokenizer: a preset model has no tokenizer; give data.tokenizer: DIR"),
    (lambda d, t: {**d, "tokenizer": str(t / "images")}, "data.tokenizer: {t}/images: no tokenizer.json"),
    (lambda d, t: {**d, "max_seq_len": 257}, "data.max_seq_len: 257 exceeds the language model's max_seq_len 256"),
    (lambda d, t: {**d, "tokenizer": str(save_tokenizer(t / "plain_tokenizer", chat_template=None))},
     "data.template: the 'chat' template needs the tokenizer's chat template, and this tokenizer has none"),
    # issue 27: these two were found only by the workers, behind 40-60 lines each
    (lambda d, t: {**d, "path": str(_written(t / "dict.json", b'{"a": 1}'))},
     "data.path: data file {t}/dict.json must hold a JSON array of entries ([...]); it starts with '{{'"),
    (lambda d, t: {**d, "path": str(_written(t / "latin1.jsonl", '[{"caption": "caf\u00e9"}]'.encode("latin-1")))},
     "data.path: data file {t}/latin1.jsonl is not UTF-8 text (byte 0xe9 near offset 17)"),
    # issue 26: the whole file is read before launch; a syntax error is named by line and column
    (lambda d, t: {**d, "path": str(_written(t / "broken.json", b'[\n  {"id": 1},\n  {"id" 2}\n]'))},
     "data.path: data file {t}/broken.json is not valid JSON: Expecting ':' delimiter at line 3 column 9"),
    (lambda d, t: {**d, "path": str(_written(t / "empty.jsonl", b"\n"))},
     "data.path: {t}/empty.jsonl holds no entries"),
])


def test_validate_refuses_bad_llava_data_before_any_worker(tmp_path, capsys, change, message):
    data = change(llava_files(tmp_path), tmp_path)
    config = parse_run_config({"parallelism": LAYOUT, "data": data})
    with pytest.raises(RunConfigError, match=re.escape(message.format(t=tmp_path))):
        plan_run(config, 2)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"parallelism": LAYOUT, "data": data}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimo validate: error: ") and message.format(t=tmp_path) in err and err.count("\n") == 1


def test_tokenizer_and_image_processing_come_from_the_model_directory(tmp_path):
    from tests.hf import tiny_hf

    tiny_hf.save_llava(tmp_path / "llava")
    tiny_hf.processor().save_pretrained(tmp_path / "llava")  # word-level tokenizer, CLIP 8 × 8 processing
    save_image(tmp_path / "images" / "a.png", width=13, height=10)
    entry = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                                                 {"from": "gpt", "value": "please"}]}
    data = {"name": "llava", "path": str(save_entries(tmp_path / "d.json", [entry])),
            "image_folder": str(tmp_path / "images"), "template": "vicuna_v1",
            "max_unknown_token_rate": 1.0}  # the tiny vocabulary lacks Vicuna's system prompt
    config = parse_run_config({"parallelism": LAYOUT, "model": {"hf": str(tmp_path / "llava")}, "data": data})
    plan_run(config, 2)
    plan = plan_model(config)
    sample = plan.dataset(plan.whole_model_provider())[0]
    assert int((sample.input_ids == tiny_hf.IMAGE_TOKEN).sum()) == 16  # CLIP 8 × 8 in 2 × 2 patches
    from PIL import Image

    want = tiny_hf.processor().image_processor(images=Image.open(tmp_path / "images" / "a.png"), return_tensors="pt")
    assert torch.equal(sample.items["images"], want["pixel_values"])


def test_mimo_train_from_a_llava_json_and_a_png_folder(tmp_path):
    entries = [pretrain_entry(f"{k}.png", ["a cat", "a dog"][k % 2]) for k in range(4)]
    entries[2] = pretrain_entry("corrupt.png")  # skipped: the next good sample (3) takes its slot
    data = llava_files(tmp_path, entries=entries)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")  # found when decoded, not by the data check
    held_out = save_entries(tmp_path / "held_out.json", [pretrain_entry("1.png", "a dog"),
                                                         pretrain_entry("missing.png"), pretrain_entry("0.png")])
    path, run_dir = write_config(tmp_path, data=data, parallelism=LAYOUT, train={"steps": 2, "global_batch_size": 4},
                                 checkpoint={"interval": 1}, eval={"path": str(held_out), "interval": 1})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [m["loss"] for m in metrics(run_dir) if m["kind"] == "train"]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    # the held-out loss at every checkpoint (the layout's 2 ranks; the bad sample left out), as one process has it
    evals = [(m["step"], m["loss"]) for m in metrics(run_dir) if m["kind"] == "eval"]
    assert [step for step, _ in evals] == [1, 2]
    model, plan = _checkpoint_model(run_dir / "checkpoints" / "step_00000002")
    assert held_out_loss(model, plan.dataset(plan.whole_model_provider(), "held_out")) == (evals[1][1], 2)
    assert f"held-out loss at step 2: {evals[1][1]:.4f} (2 samples of {held_out})" in done.stdout
    stopped = mimo("train", str(path), "--quiet", "--set", "data.on_bad_sample=error", "--set",
                   f"log.dir={tmp_path / 'stopped'}")
    assert stopped.returncode != 0
    # every rank builds the batch; the launcher names the one that failed first
    corrupt = re.escape(str(tmp_path / "images" / "corrupt.png"))
    assert re.search(f"mimo train: error: rank [01] failed: BadSample: sample 2 \\({corrupt}\\): cannot decode the "
                     f"image", stopped.stderr), stopped.stderr[-3000:]


def test_a_tokenizer_that_lacks_the_data_s_words_is_refused_before_launch(tmp_path):
    """vicuna_v1 with a word-level tokenizer that lacks the data's words: the share of `<unk>` in the first samples
    is refused above data.max_unknown_token_rate, naming words; allowed, it is a warning before launch."""
    def entry(k: int) -> dict:
        return {"image": f"{k}.png", "conversations": [
            {"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>\nwhat is this zebra"},
            {"from": "gpt", "value": "a giraffe" if k % 2 else "a cat"}]}
    data = {**llava_files(tmp_path, entries=[entry(k) for k in range(4)]), "template": "vicuna_v1"}
    config = parse_run_config({"parallelism": LAYOUT, "data": data})
    said = ("11.5% of the tokens of the first 4 samples (6 of 52) are the tokenizer's unknown token; words it lacks: "
            "'zebra', 'giraffe'")
    with pytest.raises(RunConfigError, match=re.escape(f"data.tokenizer: {said}; this tokenizer does not fit the "
                                                       f"data (use the language model's own tokenizer), or set "
                                                       f"data.max_unknown_token_rate above 0.115 to train anyway")):
        plan_run(config, 2)
    allowed = parse_run_config({"parallelism": LAYOUT, "data": {**data, "max_unknown_token_rate": 0.2}})
    assert f"data: {said}" in plan_run(allowed, 2).warnings


def test_eval_for_llava_data_is_never_silently_nothing(tmp_path):
    data = llava_files(tmp_path)
    plan = plan_run(parse_run_config({"parallelism": LAYOUT, "data": data}), 2)
    assert "eval: no held-out evaluation for this run (set eval.path: HELD_OUT.json (LLaVA-format) for a held-out " \
           "loss; eval.enabled: false silences this)" in plan.warnings
    with pytest.raises(RunConfigError, match=r"^eval.interval: 3 evaluates the checkpoint of every 3th step, so it "
                                             r"needs held-out data \(eval.path, or the digits\) and a "
                                             r"checkpoint.interval that divides it \(checkpoint.interval is 2\)"):
        parse_run_config({"parallelism": LAYOUT, "data": data, "checkpoint": {"interval": 2},
                          "eval": {"path": data["path"], "interval": 3}})
    with pytest.raises(RunConfigError, match=r"^eval.path: a held-out file is for data.name llava"):
        parse_run_config({"parallelism": LAYOUT, "eval": {"path": "x.json"}})
    config = parse_run_config({"parallelism": LAYOUT, "data": data, "eval": {"path": str(tmp_path / "none.json")}})
    with pytest.raises(RunConfigError, match=r"^eval.path: .*none.json is not a file"):
        plan_run(config, 2)


def test_a_read_that_never_returns_is_named_and_ended(tmp_path):
    """Issue 27: an image that never returns data (a FIFO stands in for a stalled network file system) hung the job
    in silence: heartbeats went on, so the hang watch never fired. The launcher now names the rank that waits past
    data.timeout_s for a batch, and ends the job: the rank and its loader worker, blocked in the read (left alive,
    it held the launcher's agent forever)."""
    data = llava_files(tmp_path)
    (tmp_path / "images" / "1.png").unlink()
    os.mkfifo(tmp_path / "images" / "1.png")  # opening it for reading blocks until a writer comes: none will
    one_rank = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}
    path, _ = write_config(tmp_path, data={**data, "num_workers": 1, "timeout_s": 1}, parallelism=one_rank,
                           train={"steps": 2, "global_batch_size": 4}, checkpoint={"interval": 0})
    t0 = time.monotonic()
    done = mimo("train", str(path), "--quiet", timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"mimo train: error: rank 0 failed: waited \d+ s for the next batch from the data loader "
                     r"\(a read that never returns: a stalled file system\?\), past its bound of 1 s \(process \d+ "
                     r"state S \(sleeping\)\); killed by the launcher", done.stderr), done.stderr[-3000:]
    assert time.monotonic() - t0 < 60
