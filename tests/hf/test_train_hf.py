"""`mimo train` from Hugging Face directories: the run config's `model: {hf: DIR}` or `{vision_hf, language_hf}`.

Parity: the same run from a saved LLaVA on one rank and on a heterogeneous TP2 layout logs the same losses
(float64, relative 1e-8), and its first loss is the loaded single-process model's. Bad sections are one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mimo.cli import main
from mimo.data import GlobalBatchSampler
from mimo.families.llava import LLAVA
from mimo.training.plan import plan_model
from mimo.training.run_config import RunConfigError, parse_run_config
from tests.hf import tiny_hf
from tests.hf.runs import HETEROGENEOUS_TP2, ONE_RANK
from tests.test_train_cli import mimo, steps_and_losses, write_config

TRAIN = {"steps": 2, "global_batch_size": 4, "num_microbatches": 2, "lr": 0.003, "dtype": "float64",
         "min_lr_ratio": 1.0}
DATA = {"name": "synthetic", "num_samples": 32, "items_per_sample": [0, 1, 2]}


def run(tmp_path, model: dict, layout: dict) -> dict[int, float]:
    """`mimo train` on `layout` (its own workers); the logged loss of every step."""
    path, run_dir = write_config(tmp_path, model=model, parallelism=layout, train=TRAIN, data=DATA,
                                 checkpoint={"interval": 0})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return steps_and_losses(run_dir)


def test_training_from_a_llava_directory_keeps_parity(tmp_path):
    tiny_hf.save_llava(tmp_path / "llava", text="qwen2", text_kw={"tie_word_embeddings": True},
                       tie_word_embeddings=True)
    model = {"hf": str(tmp_path / "llava")}
    one = run(tmp_path / "one", model, ONE_RANK)
    three = run(tmp_path / "three", model, HETEROGENEOUS_TP2)
    assert sorted(one) == sorted(three) == [1, 2]
    for step in one:
        assert abs(one[step] - three[step]) <= 1e-8 * abs(one[step]), (step, one[step], three[step])
    # the first loss is the loaded model's on the first batch (nothing trained yet): not a seeded model's
    config = parse_run_config({"parallelism": ONE_RANK, "model": model, "train": TRAIN, "data": DATA})
    provider = plan_model(config).whole_model_provider()
    loaded = provider.provide()
    data = plan_model(config).dataset(provider)
    batch = data.batch(GlobalBatchSampler(len(data), 4, config.train.seed).peek())
    loss_sum, count = loaded(batch.input_ids, batch.labels, batch.modality_inputs)
    assert abs(float(loss_sum.detach() / count) - one[1]) <= 1e-8 * one[1]


def test_training_from_a_tower_and_a_language_model(tmp_path):
    tiny_hf.save_vision(tmp_path / "siglip", "siglip")
    tiny_hf.save_language(tmp_path / "llama", "llama")
    model = {"vision_hf": str(tmp_path / "siglip"), "language_hf": str(tmp_path / "llama"),
             "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
    one = run(tmp_path / "one", model, ONE_RANK)
    three = run(tmp_path / "three", model, HETEROGENEOUS_TP2)
    for step in one:
        assert abs(one[step] - three[step]) <= 1e-8 * abs(one[step]), (step, one[step], three[step])
    spec = LLAVA.open(parse_run_config({"parallelism": ONE_RANK, "model": model}).model).spec
    assert spec.image_token_id == tiny_hf.VOCAB and spec.vision.tokens_per_image == 16


@pytest.mark.parametrize(("model", "message"), [
    ({"hf": "A", "vision_hf": "B", "language_hf": "C"}, "give either hf .* not both"),
    ({"vision_hf": "B"}, "vision_hf and language_hf go together; language_hf is missing"),
    ({"hf": "/nonexistent/dir"}, r"model: /nonexistent/dir: no such directory"),
])
def test_bad_model_sections_are_one_line(model, message):
    """Refused when the section is parsed (the pair), or when the family opens it (a missing directory)."""
    with pytest.raises(RunConfigError, match=message):
        LLAVA.open(parse_run_config({"parallelism": ONE_RANK, "model": model}).model)


def test_validate_reports_a_bad_hf_config(tmp_path, capsys):
    directory = tmp_path / "llava"
    tiny_hf.save_llava(directory, projector_hidden_act="mish")
    path, _ = write_config(tmp_path, model={"hf": str(directory)})
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "projector_hidden_act='mish' is not supported by mimo" in err


COUNT_READS = """
import collections, os, sys
import mimo.families.llava.hf_load as load
from mimo.cli import main

log = open(sys.argv[1], "a")
read_config, index = load.read_config, load.SafetensorsDir.__init__

def counted_read_config(directory):
    log.write(f"{os.getpid()} config.json {directory}\\n"); log.flush()
    return read_config(directory)

def counted_index(self, directory):
    log.write(f"{os.getpid()} safetensors {directory}\\n"); log.flush()
    index(self, directory)

load.read_config, load.SafetensorsDir.__init__ = counted_read_config, counted_index
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_hugging_face_directory_is_read_once_per_run(tmp_path, command):
    """`mimo validate` and `mimo train` read a directory's config.json and index its safetensors once, in the
    parent: the workers receive the plan and read neither (each once read them 2-4 times, then again per rank)."""
    directory = tmp_path / "llava"
    tiny_hf.save_llava(directory)
    path, _ = write_config(tmp_path, model={"hf": str(directory)}, parallelism=HETEROGENEOUS_TP2,
                           train={**TRAIN, "steps": 1}, data=DATA, checkpoint={"interval": 0, "final": False})
    log, quiet = tmp_path / "reads.log", ["--quiet"] if command == "train" else []
    done = subprocess.run([sys.executable, "-c", COUNT_READS, str(log), command, str(path), *quiet],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    reads = [line.split() for line in log.read_text().splitlines()]
    assert sorted((kind, where) for _, kind, where in reads) == [("config.json", str(directory)),
                                                                  ("safetensors", str(directory))]
    assert len({pid for pid, _, _ in reads}) == 1  # one process (`mimo`), so no worker read it again


def _int8_q_proj(directory):
    from safetensors.torch import load_file, save_file
    tensors = load_file(directory / "model.safetensors")
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _truncated(directory):
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:len(data) // 2])


def _missing_shard(directory):
    from safetensors import safe_open
    with safe_open(directory / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _wrong_shape(directory):
    from safetensors.torch import load_file, save_file
    tensors = load_file(directory / "model.safetensors")
    tensors["multi_modal_projector.linear_1.bias"] = torch.zeros(3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _heads_not_the_weights(directory):
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 4  # the weights hold 2 KV heads
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("change", "message"), [
    (_int8_q_proj, "language_model.model.layers.0.self_attn.q_proj.weight is stored as I8, but its config.json "
                   "declares no quantization; mimo reads floating-point weights only (F16, BF16, F32, F64)"),
    (_truncated, "model.safetensors: not a readable safetensors file (Error while deserializing header: incomplete "
                 "metadata, file not fully covered); is it truncated? download or copy it again"),
    (_missing_shard, "model.safetensors.index.json: names shard model-00002-of-00002.safetensors, which is not in"),
    (_wrong_shape, "multi_modal_projector.linear_1.bias has shape [3], but the model its config.json describes "
                   "needs [64]"),
    (_heads_not_the_weights, "language_model.model.layers.0.self_attn.k_proj.weight has shape [32, 64], but the "
                             "model its config.json describes needs [64, 64]"),
])
@pytest.mark.parametrize("command", ["validate", "train"])
def test_weights_that_do_not_fit_are_one_line_before_any_worker(tmp_path, capsys, change, message, command):
    """Issue 27: an int8 `q_proj` was cast silently and trained; a truncated file was a raw traceback; a missing
    shard, a wrong shape or heads that are not the weights' were found only by the workers, behind 40-60 lines."""
    directory = tmp_path / "llava"
    tiny_hf.save_llava(directory)
    change(directory)
    path, run_dir = write_config(tmp_path, model={"hf": str(directory)}, parallelism=ONE_RANK)
    capsys.readouterr()  # transformers' progress bar while saving
    assert main([command, str(path), *(["--quiet"] if command == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mimo {command}: error: ") and str(directory) in err and message in err, err
    assert err.count("\n") == 1
    assert not run_dir.exists()
