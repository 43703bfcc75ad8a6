"""`mimo train` configs: every bad key or value is a one-line error naming it and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mimo.cli import main
from mimo.training.plan import plan_run
from mimo.training.run_config import RunConfigError, load_run_config, parse_run_config

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "llava_digits.yaml"
LAYOUT = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}


def test_the_default_example_parses():
    config = load_run_config(DIGITS)
    assert config.model.preset == "tiny" and config.data.name == "digits"
    assert config.world_size == 4
    assert config.distributed_config.for_module("language").data_parallel == "ddp"
    assert config.checkpoint_dir == Path("runs/llava_digits/checkpoints")


def test_set_overrides_any_key_with_yaml_typing():
    config = load_run_config(DIGITS, ["train.steps=7", "train.lr=0.5", "train.clip_grad=null",
                                      "distributed.language.data_parallel=fsdp", "log.dir=/tmp/x"])
    assert (config.train.steps, config.train.lr, config.train.clip_grad) == (7, 0.5, None)
    assert config.distributed_config.for_module("language").data_parallel == "fsdp"
    assert config.run_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"parallelism": LAYOUT, "trainer": {}}, "unknown section(s) ['trainer']; sections are"),
        ({"model": {"preset": "tiny"}}, "missing section 'parallelism'"),
        ({"parallelism": LAYOUT, "train": {"stepz": 3}}, "train: unknown key(s) ['stepz']; allowed keys are ['steps'"),
        ({"parallelism": LAYOUT, "train": {"steps": "ten"}}, "train.steps: expected int, got 'ten' (str)"),
        ({"parallelism": LAYOUT, "train": {"steps": 2.5}}, "train.steps: expected int, got 2.5 (float)"),
        ({"parallelism": LAYOUT, "train": {"dtype": "fp8"}},
         "train.dtype: 'fp8' is not allowed; choose one of ['float32', 'bfloat16', 'float16', 'float64']"),
        ({"parallelism": LAYOUT, "model": {"preset": "70b"}}, "model.preset: '70b' is not allowed"),
        ({"parallelism": LAYOUT, "data": {"name": "imagenet"}},
         "data.name: 'imagenet' is not allowed; choose one of ['digits', 'synthetic', 'llava']"),
        ({"parallelism": LAYOUT, "train": {"clip_grad": "big"}}, "train.clip_grad: 'big' is not a float or null"),
        ({"parallelism": LAYOUT, "distributed": {"video": {}}},
         "distributed: unknown module(s) ['video']; modules are ['images', 'language']"),
        ({"parallelism": LAYOUT, "distributed": {"language": {"data_parallel": "zero"}}},
         "distributed.language.data_parallel: 'zero' is not allowed; choose one of ['ddp', 'fsdp']"),
        ({"parallelism": LAYOUT, "distributed": {"language": {"compile": "yes"}}},
         "distributed.language.compile: expected bool, got 'yes' (str)"),
        ({"parallelism": LAYOUT, "distributed": {"language": {"compute_dtype": "bfloat16"}}},  # train.dtype's
         "distributed.language: unknown key(s) ['compute_dtype']; allowed keys are ['data_parallel', "
         "'reshard_after_forward', 'compile', 'recompute_granularity', 'recompute_num_layers', 'fp8', "
         "'fp8_small_layers', 'cache_weight_casts', 'align_gemms']"),
        ({"parallelism": LAYOUT, "distributed": {"language": {"reshard_after_forward": "never"}}},
         "distributed.language: reshard_after_forward 'never' applies to data_parallel 'fsdp' only, and it is 'ddp' "
         "(use 'fsdp', or leave reshard_after_forward 'default')"),
        ({"parallelism": LAYOUT, "distributed": {"images": {"recompute_num_layers": 0}}},
         "distributed.images: recompute_num_layers must be at least 1 (or None: every block), got 0"),
        ({"parallelism": LAYOUT, "train": {"recompute_granularity": "full", "recompute_num_layers": 0}},
         "train: recompute_num_layers must be at least 1 (or None: every block), got 0"),
        ({"parallelism": {"language": {"tp": 2}}}, "parallelism: module 'language': unknown key(s) ['tp']"),
        ({"parallelism": LAYOUT, "log": []}, "log: expected a mapping, got []"),
        # issue 17's range probes: each names its key, before any worker starts
        ({"parallelism": LAYOUT, "train": {"lr": -0.1}}, "train.lr: must be >= 0, got -0.1"),
        ({"parallelism": LAYOUT, "train": {"lr": float("nan")}}, "train.lr: must be a finite number, got nan"),
        ({"parallelism": LAYOUT, "train": {"lr": float("inf")}}, "train.lr: must be a finite number, got inf"),
        ({"parallelism": LAYOUT, "train": {"steps": 0}}, "train.steps: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "train": {"global_batch_size": 0}}, "train.global_batch_size: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "train": {"num_microbatches": 0}}, "train.num_microbatches: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio: must be >= 0 and <= 1, got 1.5"),
        ({"parallelism": LAYOUT, "train": {"clip_grad": 0}}, "train.clip_grad: must be > 0, got 0.0"),
        ({"parallelism": LAYOUT, "train": {"timeout_s": 0}}, "train.timeout_s: must be > 0, got 0.0"),
        ({"parallelism": LAYOUT, "data": {"items_per_sample": [1, -1]}}, "data.items_per_sample: must be >= 0, got -1"),
        ({"parallelism": LAYOUT, "data": {"num_workers": -1}}, "data.num_workers: must be >= 0, got -1"),
        ({"parallelism": LAYOUT, "data": {"num_workers": 1.5}}, "data.num_workers: 1.5 is not a int or null"),
        ({"parallelism": LAYOUT, "data": {"prefetch_factor": 0}}, "data.prefetch_factor: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "checkpoint": {"keep": 0}}, "checkpoint.keep: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "checkpoint": {"interval": -2}}, "checkpoint.interval: must be >= 0, got -2"),
        ({"parallelism": LAYOUT, "log": {"interval": 0}}, "log.interval: must be >= 1, got 0"),
        ({"parallelism": LAYOUT, "checkpoint": {"final": False}},
         "checkpoint.final: false leaves no checkpoint for the held-out evaluation of the digits; set eval.enabled: "
         "false, or keep checkpoint.final: true"),
        ({"parallelism": {"images": {"data_parallel_size": 1},
                          "language": {"tensor_model_parallel_size": "2", "data_parallel_size": 1, "rank_offset": 1}}},
         "parallelism: module 'language': tensor_model_parallel_size must be a positive integer, got '2'"),
    ],
)
def test_config_errors(data, message):
    with pytest.raises(RunConfigError) as e:
        parse_run_config(data)
    assert message in str(e.value)


@pytest.mark.parametrize(("item", "message"), [("train.steps", "expected key=value"),
                                               ("train..steps=3", "empty key part"),
                                               ("train.steps=[1", "the value is not valid YAML")])
def test_bad_set(item, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(DIGITS, [item])


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("data", "argv", "message"),
    [
        ({"parallelism": LAYOUT, "train": {"steps": "x"}}, [], "mimo train: error: train.steps: expected int"),
        ({"parallelism": {"images": {"data_parallel_size": 2},
                          "language": {"data_parallel_size": 3, "rank_offset": 2}}}, [],
         "mimo train: error: edge images -> language: data_parallel_size 2"),
        ({"parallelism": LAYOUT}, ["--nproc-per-node", "3"], "mimo train: error: rank 2 after the last module"),
        ({"parallelism": LAYOUT}, ["--set", "train.nope=1"], "mimo train: error: train: unknown key(s) ['nope']"),
        ({"parallelism": {"images": {}, "language": {}}}, [],
         "mimo train: error: parallelism: modules ['images', 'language'] leave data_parallel_size to be derived"),
        ({"parallelism": {"images": {"data_parallel_size": "two"}, "language": {"data_parallel_size": 1}}}, [],
         "mimo train: error: parallelism: module 'images': data_parallel_size must be a positive integer, got 'two'"),
        ({"parallelism": LAYOUT}, ["--set", "parallelism.language.tensor_model_parallel_size=two"],
         "mimo train: error: parallelism: module 'language': tensor_model_parallel_size must be a positive integer"),
        ({"parallelism": LAYOUT, "log": {"interval": 0}}, [], "mimo train: error: log.interval: must be >= 1, got 0"),
    ],
)
def test_train_refuses_bad_input_before_starting(capsys, tmp_path, monkeypatch, data, argv, message):
    monkeypatch.setattr("mimo.launch.launch", _no_workers)
    assert main(["train", write(tmp_path, data), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def _no_workers(*args, **kwargs) -> int:
    raise AssertionError("workers were started for a config that does not validate")


SPLIT = {"images": {"data_parallel_size": 2}, "language": {"data_parallel_size": 4, "rank_offset": 2}}
UNSPLIT = (r"module 'language': micro-batch size 6 \(global batch 12 / 2 micro-batches\) is not divisible by "
           r"its data_parallel_size 4; use a global batch that is a multiple of 8")


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_batch_that_does_not_split_is_refused_before_any_worker(capsys, tmp_path, monkeypatch, command):
    """Global batch / micro-batches must split over every module's DP size: one line, exit 2, no worker."""
    monkeypatch.setattr("mimo.launch.launch", _no_workers)
    data = {"parallelism": SPLIT, "train": {"global_batch_size": 12, "num_microbatches": 2}}
    assert main([command, write(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert re.match(f"mimo {command}: error: {UNSPLIT}\n$", err), err
    data["train"]["global_batch_size"] = 16
    assert main(["validate", write(tmp_path, data)]) == 0


def test_the_layout_is_built_once():
    config = parse_run_config({"parallelism": LAYOUT})
    assert config.layout is config.layout
    assert plan_run(config, 2).warnings == [] and config.layout.world_size == 2


def test_validate(capsys):
    assert main(["validate", str(DIGITS)]) == 0
    assert "valid; heterogeneous on 4 ranks" in capsys.readouterr().out


def test_validate_names_an_unknown_world_size(capsys, tmp_path):
    assert main(["validate", write(tmp_path, {"parallelism": {"images": {}, "language": {}}})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimo validate: error: parallelism: modules ['images', 'language'] leave "
                          "data_parallel_size to be derived") and err.rstrip().endswith("(--nproc-per-node N)")
    assert main(["validate", write(tmp_path, {"parallelism": {"images": {}, "language": {}}}),
                 "--nproc-per-node", "2"]) == 0  # homogeneous: both derive DP 2


def test_digits_without_scikit_learn_is_a_clear_error(monkeypatch):
    import importlib.util

    from mimo.training.plan import plan_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    config = load_run_config(DIGITS)
    with pytest.raises(RunConfigError, match="scikit-learn is not installed: pip install scikit-learn"):
        plan_run(config, config.world_size)


@pytest.mark.parametrize("command", ["validate", "train"])
def test_sizes_given_as_text_are_one_line(capsys, tmp_path, command):
    """Issue 17: TP "2" in the file or DP via --set was a TypeError traceback from validate and train."""
    path = write(tmp_path, {"parallelism": {"images": {"data_parallel_size": 1},
                                            "language": {"tensor_model_parallel_size": "2", "rank_offset": 1,
                                                         "data_parallel_size": 1}}})
    assert main([command, path]) == 2
    err = capsys.readouterr().err
    assert err == (f"mimo {command}: error: parallelism: module 'language': tensor_model_parallel_size must be a "
                   f"positive integer, got '2'\n")
    assert main([command, write(tmp_path, {"parallelism": LAYOUT}), "--set",
                 "parallelism.images.data_parallel_size=two"]) == 2
    assert "data_parallel_size must be a positive integer, got 'two'" in capsys.readouterr().err


def test_exponent_floats_are_numbers(tmp_path):
    """Issue 17: `lr: 3e-3` (YAML 1.1: a string) is the float users mean, in the file and in --set."""
    path = tmp_path / "run.yaml"
    path.write_text("parallelism: {language: {data_parallel_size: 1}}\ntrain: {lr: 3e-3, weight_decay: 1E-2}\n")
    config = load_run_config(path)
    assert (config.train.lr, config.train.weight_decay) == (3e-3, 1e-2)
    assert load_run_config(path, ["train.lr=5e-4"]).train.lr == 5e-4
    with pytest.raises(RunConfigError, match="train.steps: expected int, got 1000.0"):
        load_run_config(path, ["train.steps=1e3"])


def test_dotted_exponent_floats_are_numbers(tmp_path):
    """Issue 27: `4.0e3` (YAML 1.1 wants a signed exponent: a string) is a float, in the file and in --set."""
    path = tmp_path / "run.yaml"
    path.write_text("parallelism: {language: {data_parallel_size: 1}}\ntrain: {lr: 4.0e-3, clip_grad: 4.0e3}\n")
    config = load_run_config(path, ["train.weight_decay=.5e-1"])
    assert (config.train.lr, config.train.clip_grad, config.train.weight_decay) == (4e-3, 4e3, 0.05)


def _bomb(levels: int) -> str:
    """A billion-laughs document: each level is nine aliases of the one before (9**levels strings)."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize("command", ["validate", "layout"])
def test_an_alias_bomb_is_one_short_line(capsys, tmp_path, command):
    """Issue 27: 1.6 KB of aliases drove `mimo validate` past 4 GB; a smaller bomb printed a 5.8 MB error."""
    path = tmp_path / "run.yaml"
    path.write_text(f"{_bomb(10)}\nparallelism: {{language: {{data_parallel_size: 1}}}}\n")
    assert main([command, str(path)]) == 2
    assert "expands to more than 10000 values through its aliases" in capsys.readouterr().err


def test_a_document_nested_thousands_deep_is_one_line(capsys, tmp_path):
    """Found while fixing issue 27's alias bomb: 3000 nested brackets were a RecursionError traceback."""
    path = tmp_path / "run.yaml"
    path.write_text(f"parallelism: {'[' * 3000}{']' * 3000}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (f"mimo validate: error: {path}: nested too deeply to be a config (thousands "
                                       f"of levels)\n")


def test_aliases_within_the_bound_work_and_errors_quote_values_short(capsys, tmp_path):
    """Issue 27: aliases that share a layout still work; a value quoted in an error is cut to a short length."""
    path = tmp_path / "run.yaml"
    path.write_text("parallelism: {images: &one {data_parallel_size: 1}, language: *one}\n")
    assert load_run_config(path).layout.get_parallelism("images").data_parallel_size == 1
    path.write_text(f"parallelism: {{language: {{data_parallel_size: 1}}}}\n"
                    f"train: {{lr: [{', '.join(['x' * 1000] * 9)}]}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr: " in err and "... (9036 characters)" in err and len(err) < 300


@pytest.mark.parametrize(("text", "lines"), [
    ("parallelism: {language: {data_parallel_size: 1}}\ntrain: {lr: 0.1}\ntrain: {steps: 3}\n", "2 and 3"),
    ("parallelism: {language: {data_parallel_size: 1}}\ntrain:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "3 and 5"),
])
def test_a_key_given_twice_is_refused_with_both_lines(capsys, tmp_path, text, lines):
    """Issue 27: a second `train:` section (or `lr:`) silently replaced the first."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"appears twice in one mapping, on lines {lines}" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["validate", "train", "layout"])
def test_a_file_that_is_not_text_is_one_line(capsys, tmp_path, command):
    """Issue 17: a config that is not UTF-8 was a UnicodeDecodeError traceback."""
    path = tmp_path / "run.yaml"
    path.write_bytes(b"parallelism:\n  language: {}\n\xff\xfe\x00binary")
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"mimo {command}: error: {path}: not a UTF-8 text file (byte 0xff at offset 28); a config is "
                   f"YAML text\n")


def test_an_unusable_checkpoint_dir_is_one_line_before_launch(capsys, tmp_path):
    """Issue 17: a checkpoint.dir that is a file (or under one) failed only at the first save. (A read-only
    directory is the same check, but cannot be shown here: the tests run as root, who may write anywhere.)"""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = write(tmp_path, {"parallelism": LAYOUT, "log": {"dir": str(tmp_path / "run")}})
    assert main(["train", path, "--set", f"checkpoint.dir={blocker}"]) == 2
    assert capsys.readouterr().err == f"mimo train: error: checkpoint.dir: {blocker} is a file, not a directory\n"
    assert main(["train", path, "--set", f"checkpoint.dir={blocker / 'ckpt'}"]) == 2
    assert capsys.readouterr().err == (f"mimo train: error: checkpoint.dir: {blocker / 'ckpt'} is not a writable "
                                       f"directory (Not a directory)\n")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(("layout", "world", "message"), [
    # issue 17's probes: each once passed `mimo validate` and failed inside the workers 10-20 s later
    ({"images": {"data_parallel_size": 1},
      "language": {"pipeline_model_parallel_size": 3, "data_parallel_size": 1, "rank_offset": 1}}, 4,
     "parallelism: the language model has 2 layers, fewer than its 3 pipeline stages; use "
     "pipeline_model_parallel_size <= 2"),
    ({"images": {"pipeline_model_parallel_size": 3, "data_parallel_size": 1},
      "language": {"data_parallel_size": 1, "rank_offset": 3}}, 4,
     "parallelism: module 'images': the encoder has 2 layers, fewer than its 3 pipeline stages; use "
     "pipeline_model_parallel_size <= 2"),
    ({"images": {"tensor_model_parallel_size": 3}, "language": {"tensor_model_parallel_size": 3}}, 3,
     "parallelism: module 'images': encoder.encoder.layers.0.self_attn.q_proj has 32 output features, not "
     "divisible by tensor_model_parallel_size 3; choose a TP size that divides 32"),
    ({"images": {"data_parallel_size": 1},
      "language": {"tensor_model_parallel_size": 3, "data_parallel_size": 1, "rank_offset": 1}}, 4,
     "parallelism: module 'language': embed_tokens has 256 vocabulary entries, not divisible by "
     "tensor_model_parallel_size 3"),
])
def test_a_model_that_does_not_split_as_the_layout_asks_is_refused_before_launch(layout, world, message):
    config = parse_run_config({"parallelism": layout, "model": {"preset": "tiny"}, "train": {"global_batch_size": 12}})
    with pytest.raises(RunConfigError) as caught:
        plan_run(config, world)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_layout_the_model_splits_into_passes():
    config = parse_run_config({"parallelism": {"images": {"tensor_model_parallel_size": 2},
                                               "language": {"tensor_model_parallel_size": 2}},
                               "model": {"preset": "tiny"}})
    assert plan_run(config, 2).warnings == []


@pytest.mark.parametrize("command", ["validate", "train"])
def test_sequence_parallel_without_tensor_parallelism_is_one_line(capsys, tmp_path, monkeypatch, command):
    """sequence_parallel shards over the TP group: with TP 1 it is refused before any worker, with TP 2 valid."""
    monkeypatch.setattr("mimo.launch.launch", _no_workers)
    layout = {"images": {"data_parallel_size": 1},
              "language": {"data_parallel_size": 1, "rank_offset": 1, "sequence_parallel": True}}
    assert main([command, write(tmp_path, {"parallelism": layout})]) == 2
    assert capsys.readouterr().err == (
        f"mimo {command}: error: parallelism: module 'language': sequence_parallel shards the sequence over the "
        f"tensor-parallel group, but tensor_model_parallel_size is 1; set sequence_parallel false or "
        f"tensor_model_parallel_size > 1\n")
    layout["language"]["tensor_model_parallel_size"] = 2
    assert main(["validate", write(tmp_path, {"parallelism": layout})]) == 0


@pytest.mark.parametrize(("layout", "message"), [
    ({**LAYOUT, "audio": {"data_parallel_size": 1}},
     "parallelism: the parallelism config has layouts for ['audio'], which the model does not have; the model's "
     "modules are ['images', 'language']: give exactly one layout per module"),
    ({"image": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}},
     "parallelism: the parallelism config has layouts for ['image'], which the model does not have, and no layout "
     "for ['images'] (did you mean 'images' for 'image'?)"),
])
def test_a_layout_for_a_module_the_model_lacks_is_one_line(capsys, tmp_path, layout, message):
    """Issue 27: an `audio:` layout with no audio model, or a misspelled `image:`, was a ProviderError traceback."""
    assert main(["validate", write(tmp_path, {"parallelism": layout, "model": {"preset": "tiny"}})]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mimo validate: error: {message}") and err.count("\n") == 1, err
