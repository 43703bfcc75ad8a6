"""`mimo train` of the digits default with the language model in fp8 on one GPU (issue 28): the held-out caption
accuracy stays >= 90% (the bf16/float32 default reaches about 95%). Skipped without a GPU of compute capability 8.9+
or without torchao.

The default's layout needs four ranks; here both modules share the one GPU (DP 1 each). The tiny model's layers
are all below torchao's size thresholds, so `fp8_small_layers: convert` converts every one whose dims are
multiples of 16 (all but the head): the run's fp8 line says which. `train.compile` on and off. The evaluation runs
the trained (float32 master) weights in one process without fp8.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.test_train_cli import metrics, mimo

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)
    or importlib.util.find_spec("torchao") is None,
    reason="needs a CUDA GPU of compute capability 8.9+ and torchao (pip install 'mimo[fp8]')")

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "llava_digits.yaml"
ONE_GPU = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 0}}


@pytest.mark.parametrize("compiled", [False, True])
def test_the_digits_default_reaches_90_percent_in_fp8(tmp_path, compiled):
    sets = [f"parallelism.images={json.dumps(ONE_GPU['images'])}",
            f"parallelism.language={json.dumps(ONE_GPU['language'])}",
            "train.dtype=bfloat16", f"train.compile={str(compiled).lower()}",
            "distributed.language.fp8=tensorwise", "distributed.language.fp8_small_layers=convert",
            f"log.dir={tmp_path / 'run'}"]
    done = mimo("train", str(DIGITS), *(a for s in sets for a in ("--set", s)),
                timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp8 language tensorwise: converted 14 linear layers" in done.stdout, done.stdout[:2000]
    accuracy = [m["exact_match"] for m in metrics(tmp_path / "run") if m["kind"] == "eval"][-1]
    print(f"\nfp8 digits (compile {compiled}): held-out exact match {accuracy:.1%}")
    assert accuracy >= 0.90
