"""The built-in digits through the LLaVA path: files written once to the cache, the shipped tokenizer, and
samples equal to `DigitsDataset`'s (the reference the default run was tuned on)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from mimo.data import DigitsDataset
from mimo.data.digits_llava import (
    CACHE_NAME,
    DIGITS_TOKENIZER,
    build_digits_tokenizer,
    digits_llava_files,
    digits_tokenizer_config,
)
from mimo.families.llava import IMAGES
from mimo.training.plan import plan_model
from mimo.training.run_config import parse_run_config

LAYOUT = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}


def test_the_shipped_tokenizer_is_the_one_the_builder_makes():
    shipped = json.loads((DIGITS_TOKENIZER / "tokenizer.json").read_text())
    assert shipped == json.loads(build_digits_tokenizer().to_str())
    assert json.loads((DIGITS_TOKENIZER / "tokenizer_config.json").read_text()) == digits_tokenizer_config()


def test_llava_digits_samples_equal_the_digits_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_CACHE_DIR", str(tmp_path))
    config = parse_run_config({"parallelism": LAYOUT, "train": {"dtype": "float64"}})
    provider = plan_model(config).whole_model_provider()
    for split in ("train", "held_out"):
        files = plan_model(config).dataset(provider, split)
        reference = DigitsDataset(IMAGES, split, dtype=torch.float64)
        assert len(files) == len(reference)
        for i in range(len(files)):
            got, want = files[i], reference[i]
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
            # PNG grey levels round(v * 255 / 16), normalized in float32: within 1/255 of the scan's v / 8 - 1
            assert (got.items["images"] - want.items["images"]).abs().max() <= 1 / 255 + 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]  # no temporary directory left


def test_the_files_are_written_once_even_by_two_processes_at_once(tmp_path):
    script = f"from mimo.data.digits_llava import digits_llava_files; from pathlib import Path; " \
             f"print(digits_llava_files(Path({str(tmp_path)!r})))"
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=240)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0] and outputs == [str(tmp_path / CACHE_NAME)] * 2
    files = tmp_path / CACHE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]
    assert len(list((files / "images").glob("*.png"))) == 1797
    assert [len(json.loads((files / f"{s}.json").read_text())) for s in ("train", "held_out")] == [1500, 297]
    stamp = (files / "train.json").stat().st_mtime_ns
    assert digits_llava_files(tmp_path) == files and (files / "train.json").stat().st_mtime_ns == stamp
