"""examples/llava_own_data.yaml over the data examples/own_llava_data.py writes: a valid run, its tokenizer spells every
word of the data, and its held-out loss and answers are on (the run itself: about 15 s on 2 cores; not run here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from mimo.training.plan import plan_run
from mimo.training.run_config import parse_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_own_data_example_is_a_valid_run_over_its_script_s_data(tmp_path):
    spec = importlib.util.spec_from_file_location("own_llava_data", EXAMPLES / "own_llava_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path / "colors")
    text = (EXAMPLES / "llava_own_data.yaml").read_text().replace("runs/", f"{tmp_path}/")
    config = parse_run_config(yaml.safe_load(text))
    plan = plan_run(config, 1)
    assert config.evaluates and config.eval.interval == 40 and config.answers_held_out and plan.warnings == []
    sample = plan.dataset(plan.whole_model_provider(), "held_out")[0]
    assert int((sample.labels != -100).sum()) == 2  # the colour and the end of the answer
