"""Model families through `mimo train`: the built-in family's images + audio example trains on its heterogeneous
layout exactly as one process does (float64), and a family's refusals name what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mimo.testing import assert_matches_reference
from mimo.training.checkpoint import load_model_only
from mimo.training.plan import plan_model, plan_run
from mimo.training.run_config import load_run_config
from tests.test_train_cli import mimo, refused, steps_and_losses

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "images_audio.yaml"
QWEN_EXAMPLE = EXAMPLE.with_name("qwen_vl_tiny.yaml")
EXACT = ["--set", "train.dtype=float64", "--set", "train.steps=3", "--set", "train.warmup_steps=0",
         "--set", "log.interval=1", "--set", "checkpoint.interval=0", "--set", "data.num_samples=64"]
ONE_PROCESS = "parallelism={images: {data_parallel_size: 1}, audio: {data_parallel_size: 1}, " \
              "language: {data_parallel_size: 1}}"


def _final_parameters(run_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The whole model of a run's last checkpoint, loaded into one process."""
    config = load_run_config(EXAMPLE, [*overrides[1::2], f"log.dir={run_dir}"])
    model = plan_model(config).whole_model_provider().provide()
    load_model_only(sorted((run_dir / "checkpoints").iterdir())[-1], model)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """The example trained on its layout and as one process, once: each run's directory and overrides."""
    root, made = tmp_path_factory.mktemp("families"), {}
    for name, extra in (("layout", []), ("one", ["--set", ONE_PROCESS])):
        run_dir = root / name
        done = mimo("train", str(EXAMPLE), *EXACT, *extra, "--set", f"log.dir={run_dir}", "--quiet")
        assert done.returncode == 0, done.stderr[-3000:]
        made[name] = (run_dir, [*EXACT, *extra])
    return made


def test_images_and_audio_train_on_their_layout_as_one_process(runs):
    """The example's layout (images rank 0, audio rank 1, language TP2 on ranks 2-3) against one process: the same
    losses every step and the same final parameters, to 1e-8 in float64."""
    losses = {name: steps_and_losses(run_dir) for name, (run_dir, _) in runs.items()}
    assert list(losses["layout"]) == [1, 2, 3]
    assert_matches_reference({"loss": torch.tensor(list(losses["layout"].values()), dtype=torch.float64)},
                             {"loss": torch.tensor(list(losses["one"].values()), dtype=torch.float64)}, "losses")
    got, want = (_final_parameters(*runs[name]) for name in ("layout", "one"))
    assert sorted(got) == sorted(want) and any(n.startswith("modality_submodules.audio.encoder.") for n in got)
    assert_matches_reference(got, want, "final parameters")


def test_a_family_refuses_what_it_does_not_have(tmp_path, runs):
    """An unknown family, a key of another family's section, data the family does not read, a freeze naming a
    modality the model lacks, export of a family with no Hugging Face form: one line each, naming what is wrong."""
    config = str(EXAMPLE)
    cases = {
        "model.family=gpt": "model.family: 'gpt' is not a model family; choose one of ['llava', 'qwen_vl', "
                            "'builtin']",
        "model.preset=tiny": "model: unknown key(s) ['preset']; allowed keys are ['family', 'language', 'images', "
                             "'audio', 'freeze_language_model', 'freeze_encoders', 'freeze_projections']",
        "data.name=digits": "data.name: the builtin family does not read 'digits' data; it reads ['synthetic']",
        "model.freeze_encoders=[video]": "model.freeze_encoders: ['video'] are not modalities of this model; its "
                                         "modalities are ['images', 'audio']",
    }
    for item, message in cases.items():
        done = refused("validate", config, "--set", item)
        assert done.returncode == 2 and done.stderr == f"mimo validate: error: {message}\n", (item, done.stderr)
    checkpoint = sorted((runs["layout"][0] / "checkpoints").iterdir())[-1]  # a builtin-family checkpoint
    exported = refused("export-hf", str(checkpoint), str(tmp_path / "out"))
    assert exported.returncode == 2
    assert exported.stderr == (f"mimo export-hf: error: checkpoint {checkpoint}: the builtin family has no Hugging "
                               f"Face form to export to\n")


def test_qwen_vl_resumes_on_another_layout_as_the_straight_run(tmp_path):
    """The tiny Qwen3-VL example (packed images of four sizes, DeepStack, M-RoPE, packed rows) on its colocated
    layout (tower DP2, language TP2), then its step 3 again from the step-2 checkpoint on a heterogeneous layout
    (tower on rank 0, language on rank 1): the straight run's loss, to 1e-8 in float64. (Each layout equals one
    process: tests/training/test_qwen_parity.py.)"""
    exact = [*EXACT, "--set", "checkpoint.interval=2"]
    run_dir = tmp_path / "run"
    first = mimo("train", str(QWEN_EXAMPLE), *exact, "--set", f"log.dir={run_dir}", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    want = steps_and_losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")  # resume from step 2
    other = "parallelism={images: {data_parallel_size: 1}, language: {data_parallel_size: 1, rank_offset: 1}}"
    resumed = mimo("train", str(QWEN_EXAMPLE), *exact, "--set", other, "--set", f"log.dir={run_dir}", "--resume",
                   "--quiet")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    got = steps_and_losses(run_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    assert_matches_reference({"loss": torch.tensor([got[3]], dtype=torch.float64)},
                             {"loss": torch.tensor([want[3]], dtype=torch.float64)}, "the resumed step's loss")
    asked = refused("generate", "--checkpoint", str(run_dir / "checkpoints" / "step_00000003"), "--image",
                    str(tmp_path / "any.png"), "--prompt", "what is this")
    assert asked.returncode == 2 and asked.stderr == (
        "mimo generate: error: the model was trained from a preset on data with no tokenizer (synthetic): there is no "
        "tokenizer to prompt it with; train on LLaVA-format data with data.tokenizer, or from a Qwen-VL directory "
        "(model.hf)\n"), asked.stderr


def test_qwen_vl_plans_deepstack_on_every_layout():
    """DeepStack's features cross pipeline stages and run under sequence parallelism (once refused): both layouts
    of the Qwen3-VL-8B shapes plan (in process), a DeepStack layer on stage 1 of 32 included."""
    cases = {"parallelism.language.sequence_parallel=true": 2,
             "parallelism={images: {data_parallel_size: 32}, language: {pipeline_model_parallel_size: 32, "
             "data_parallel_size: 1}}": 32}
    for item, world in cases.items():
        config = load_run_config(QWEN_EXAMPLE, ["model.preset=qwen3-vl-8b", "train.global_batch_size=64", item])
        plan_run(config, world)
