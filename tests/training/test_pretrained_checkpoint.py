"""`checkpoint.pretrained_checkpoint`: a new run starts from another run's weights (any layout), with a fresh
optimizer, schedule, step and data position; a checkpoint that is missing or does not fit is refused by
`mimo validate` and `mimo train` before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimo.training.checkpoint import load_model_only
from mimo.training.plan import plan_model
from mimo.training.run_config import parse_run_config
from tests.test_train_cli import RUN, metrics, mimo, refused, write_config

ONE_RANK = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 0}}


def tiny_model():
    """The run's tiny model in this process, at its seeded (layout-independent) initial values."""
    return plan_model(parse_run_config(RUN)).whole_model_provider(torch.device("cpu")).provide()


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole tiny model's parameters as a checkpoint holds them."""
    model = tiny_model()
    load_model_only(checkpoint, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """A 2-step run on two ranks (images on rank 0, language on rank 1): the pretrained run directory."""
    path, run = write_config(tmp_path_factory.mktemp("first"), train={"steps": 2}, checkpoint={"interval": 0})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_a_run_starts_from_another_runs_weights_on_another_layout(first, tmp_path):
    trained = weights(first / "checkpoints" / "step_00000002")
    initial = {k: v.detach() for k, v in tiny_model().state_dict().items()}
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # so equality below means loading
    # one rank instead of two, lr 0: the second run's weights stay what it loaded (the run directory names
    # the newest checkpoint), and its own step count starts at 0
    path, second = write_config(tmp_path, parallelism=ONE_RANK, train={"steps": 1, "lr": 0.0},
                                checkpoint={"interval": 0, "pretrained_checkpoint": str(first)})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["step"] for m in metrics(second) if m["kind"] == "train"] == [1]
    loaded = weights(second / "checkpoints" / "step_00000001")
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key


def test_a_missing_or_unfitting_pretrained_checkpoint_is_refused_before_starting(first, tmp_path):
    missing = tmp_path / "nowhere"
    path, _ = write_config(tmp_path / "a", checkpoint={"pretrained_checkpoint": str(missing)})
    missing_one = refused("validate", str(path))
    assert missing_one.returncode == 2
    assert f"checkpoint.pretrained_checkpoint: no checkpoint at {missing}: the directory does not exist" \
        in missing_one.stderr
    # a model of other shapes (the 1b preset, checked on the meta device: nothing is allocated)
    path, _ = write_config(tmp_path / "c", model={"preset": "1b"},
                           checkpoint={"pretrained_checkpoint": str(first / "checkpoints")})
    unfitting = refused("train", str(path), "--quiet")
    assert unfitting.returncode == 2
    assert "checkpoint.pretrained_checkpoint: checkpoint" in unfitting.stderr and "does not fit this model" \
        in unfitting.stderr and "in the checkpoint vs" in unfitting.stderr
