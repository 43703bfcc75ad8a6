"""Checkpoints leave out the frozen parts read from Hugging Face directories (`checkpoint.save_frozen_hf_weights`).

A LLaVA-stage-1-like run (a CLIP tower and a Llama from tiny random directories, both frozen; the projector trains)
writes only the projector: `--resume` (on another layout), a pretrained checkpoint for stage 2, `load_model_only` and
`mimo export-hf` take the rest from the run's own directories and match a full checkpoint exactly (float64). A
checkpoint whose directory is not named, or whose fingerprint differs, is refused in one line before any worker.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimo.training.checkpoint import (
    HF_WEIGHTS,
    OPTIMIZER,
    RNG,
    CheckpointError,
    HFPart,
    load_model_only,
    omitted_prefixes,
    open_checkpoint,
)
from mimo.training.loop import check_resume_fits
from mimo.training.plan import plan_model
from mimo.training.run_config import load_run_config, parse_run_config
from tests.hf import tiny_hf
from tests.test_train_cli import in_process, mimo, refused, steps_and_losses, write_config

HOMOGENEOUS = {"images": {"data_parallel_size": 2}, "language": {"data_parallel_size": 2}}
LANGUAGE_TP2 = {"images": {"data_parallel_size": 1},
                "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 1}}
DATA = {"name": "synthetic", "num_samples": 32, "items_per_sample": [0, 1, 2]}
PROJECTOR = "modality_submodules.images.projection."


def stage1_model(root: Path, **changes) -> dict:
    """Stage 1's model section over the tiny directories in `root`: both towers frozen, the projector trains."""
    return {"vision_hf": str(root / "clip"), "language_hf": str(root / "llama"), "freeze_vision_encoder": True,
            "freeze_language_model": True, **changes}


def train(tmp_path: Path, model: dict, *args: str, **sections: dict) -> Path:
    """`mimo train` of the stage-1 run (RUN's two-rank layout, 4 float64 steps, checkpoints at 2 and 4); its
    run directory."""
    path, run_dir = write_config(tmp_path, model=model, data=DATA, **sections)
    done = mimo("train", str(path), "--quiet", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny directories, and stage 1 straight through twice: leaving the towers out (`small`) and, with
    save_frozen_hf_weights, saving every parameter (`full`, 2 steps)."""
    root = tmp_path_factory.mktemp("frozen_hf")
    tiny_hf.save_vision(root / "clip", "clip")
    tiny_hf.save_language(root / "llama", "llama")
    small = train(root / "small", stage1_model(root))
    full = train(root / "full", stage1_model(root), "--set", "train.steps=2",
                 checkpoint={"save_frozen_hf_weights": True})
    return {"root": root, "small": small, "full": full}


@pytest.fixture(scope="module")
def from_pretrained(runs, tmp_path_factory) -> Callable[[str], Path]:
    """Stage 1 for 2 steps from the step-2 checkpoint of `runs[source]` (checkpoint.pretrained_checkpoint), run
    once per source for the tests that take it; its run directory."""
    made: dict[str, Path] = {}

    def run(source: str) -> Path:
        if source not in made:
            pretrained = runs[source] / "checkpoints" / "step_00000002"
            made[source] = train(tmp_path_factory.mktemp(f"from_{source}"), stage1_model(runs["root"]), "--set",
                                 "train.steps=2", checkpoint={"pretrained_checkpoint": str(pretrained)})
        return made[source]

    return run


def saved_keys(checkpoint: Path) -> set[str]:
    """The tensor keys DCP's metadata lists (parameters, optimizer state, RNG)."""
    return set(open_checkpoint(checkpoint)[0].state_dict_metadata)


def size(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.iterdir())


def whole_model(root: Path, checkpoint: Path, **model_changes) -> dict[str, torch.Tensor]:
    """The whole stage-1 model built in this process (from the directories) with `checkpoint` loaded."""
    config = parse_run_config({"parallelism": HOMOGENEOUS, "model": stage1_model(root, **model_changes),
                               "train": {"dtype": "float64"}})
    model = plan_model(config).whole_model_provider(torch.device("cpu")).provide()
    load_model_only(checkpoint, model, plan_model(config).hf_parts)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_stage1_checkpoint_holds_only_the_projector(runs):
    small, full = runs["small"] / "checkpoints" / "step_00000002", runs["full"] / "checkpoints" / "step_00000002"
    keys = saved_keys(small)
    parameters = {k for k in keys if not k.startswith(OPTIMIZER) and k != RNG}
    assert parameters and all(k.startswith(PROJECTOR) for k in parameters), sorted(parameters)
    assert {k for k in keys if k.startswith(OPTIMIZER)} == {f"{OPTIMIZER}{k}.{s}" for k in parameters
                                                            for s in ("exp_avg", "exp_avg_sq", "step")}
    # save_frozen_hf_weights: true keeps every parameter (as before), the towers' too
    everything = saved_keys(full)
    assert keys < everything
    assert any(k.startswith("modality_submodules.images.encoder.") for k in everything)
    assert any(k.startswith("language_model.") for k in everything)
    assert size(small) * 5 < size(full), (size(small), size(full))  # 0.19 MB vs 1.34 MB (float64, AdamW)
    # where the towers come from: the directories and their fingerprints
    info = json.loads((small / "mimo.json").read_text())
    assert sorted(info[HF_WEIGHTS]) == ["language_model", "vision_encoder"]
    # format 2: a mimo from before refuses it by its format ("this mimo reads 1"), not by missing keys
    assert info["format"] == 2 and json.loads((full / "mimo.json").read_text())["format"] == 1
    vision = info[HF_WEIGHTS]["vision_encoder"]
    assert vision["directory"] == str(runs["root"] / "clip") and vision["setting"] == "model.vision_hf"
    assert vision["prefix"] == "modality_submodules.images.encoder."
    assert vision["fingerprint"]["sizes"] == {"model.safetensors": (runs["root"] / "clip" / "model.safetensors")
                                              .stat().st_size}
    assert set(vision["fingerprint"]["sha256"]) == {"config.json"}
    assert json.loads((full / "mimo.json").read_text())[HF_WEIGHTS] == {}
    # leaving the towers out changes nothing in training
    assert steps_and_losses(runs["full"]) == {s: v for s, v in steps_and_losses(runs["small"]).items() if s <= 2}


def test_resume_from_a_projector_only_checkpoint_on_another_layout_continues_the_run(runs, tmp_path):
    """Saved with the language model whole on rank 1, resumed with it tensor-parallel on ranks 1-2: each rank
    reads its shard of the frozen model from the directory, and only the projector from the checkpoint."""
    losses = steps_and_losses(runs["small"])
    path, run_dir = write_config(tmp_path, model=stage1_model(runs["root"]), data=DATA, parallelism=LANGUAGE_TP2)
    shutil.copytree(runs["small"] / "checkpoints" / "step_00000002", run_dir / "checkpoints" / "step_00000002")
    resumed = mimo("train", str(path), "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = steps_and_losses(run_dir)
    assert sorted(again) == [3, 4] and losses[3] != losses[4]
    for step in (3, 4):
        assert abs(again[step] - losses[step]) <= 1e-8 * abs(losses[step]), (step, again[step], losses[step])


def test_stage2_and_export_from_a_projector_only_checkpoint_equal_a_full_ones(runs, tmp_path):
    root = runs["root"]
    small, full = runs["small"] / "checkpoints" / "step_00000002", runs["full"] / "checkpoints" / "step_00000002"
    reference = whole_model(root, full)
    loaded = whole_model(root, small)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    # stage 2 (the language model trains, lr 0 here) on one rank: the projector from the small checkpoint, the
    # rest from the directories; its own checkpoint leaves out only the still-frozen tower
    stage2 = train(tmp_path / "stage2", stage1_model(root, freeze_language_model=False),
                   parallelism={"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}},
                   train={"steps": 1, "lr": 0.0}, checkpoint={"interval": 0, "pretrained_checkpoint": str(small)})
    after = stage2 / "checkpoints" / "step_00000001"
    assert sorted(json.loads((after / "mimo.json").read_text())[HF_WEIGHTS]) == ["vision_encoder"]
    assert any(k.startswith("language_model.") for k in saved_keys(after))
    weights = whole_model(root, after, freeze_language_model=False)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    # mimo export-hf writes the same tensors from either checkpoint
    for name, checkpoint in (("small", small), ("full", full)):
        done = in_process("export-hf", str(checkpoint), str(tmp_path / f"export_{name}"))
        assert done.returncode == 0, done.stderr[-3000:]
    exported = [load_file(tmp_path / f"export_{n}" / "model.safetensors") for n in ("small", "full")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[1])


def refusal(checkpoint: Path, name: str, recorded: Path, setting: str, configured: Path, difference: str) -> str:
    return (f"checkpoint {checkpoint} leaves out the frozen {name}, whose weights come from the Hugging Face "
            f"directory {recorded}, but this run's {setting} {configured} is not that directory ({difference}): "
            f"set {setting} to {recorded} or to an unchanged copy of it (--set {setting}=PATH)")


def test_a_resume_with_another_directory_is_refused_before_any_worker_starts(runs, tmp_path):
    root = runs["root"]
    shutil.copytree(root / "clip", tmp_path / "clip")
    shutil.copytree(root / "llama", tmp_path / "llama")
    path, run_dir = write_config(tmp_path / "run", model=stage1_model(tmp_path), data=DATA)
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    shutil.copytree(runs["small"] / "checkpoints" / "step_00000002", checkpoint)
    check_resume_fits(plan_model(load_run_config(path)), checkpoint)  # an unchanged copy is the same directory
    # its config.json rewritten (the same model, another text)
    text = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps(text, indent=4, sort_keys=True))
    done = refused("train", str(path), "--quiet", "--resume")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "mimo train: error: " + refusal(checkpoint, "vision_encoder", root / "clip",
                                                         "model.vision_hf", tmp_path / "clip",
                                                         "its config.json differs") + "\n"
    shutil.copy(root / "clip" / "config.json", tmp_path / "clip" / "config.json")
    # a weight file of another size (one tensor more)
    tensors = load_file(tmp_path / "llama" / "model.safetensors")
    save_file({**tensors, "extra": torch.zeros(3)}, tmp_path / "llama" / "model.safetensors", {"format": "pt"})
    before, after = ((d / "model.safetensors").stat().st_size for d in (root / "llama", tmp_path / "llama"))
    done = refused("train", str(path), "--quiet", "--resume")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "mimo train: error: " + refusal(checkpoint, "language_model", root / "llama",
                                                         "model.language_hf", tmp_path / "llama",
                                                         f"model.safetensors is {after} bytes, not {before}") + "\n"
    # other weights of the same size and shapes (a fine-tune, another revision): the sampled bytes tell
    save_file({k: v + 0.5 for k, v in tensors.items()}, tmp_path / "llama" / "model.safetensors", {"format": "pt"})
    assert (tmp_path / "llama" / "model.safetensors").stat().st_size == before
    done = refused("train", str(path), "--quiet", "--resume")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "mimo train: error: " + refusal(checkpoint, "language_model", root / "llama",
                                                         "model.language_hf", tmp_path / "llama",
                                                         "model.safetensors holds other weights of the same "
                                                         "size") + "\n"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()  # nothing started


def test_a_run_naming_no_directory_for_a_part_left_out_is_refused(runs, tmp_path):
    small = runs["small"] / "checkpoints" / "step_00000002"
    expected = (f"checkpoint {small} leaves out the frozen vision_encoder, whose weights come from the Hugging Face "
                f"directory {runs['root'] / 'clip'} (model.vision_hf), but this run reads vision_encoder from no "
                f"Hugging Face directory: set model.vision_hf to {runs['root'] / 'clip'} (or to a copy of it)")
    # a preset model as stage 2: refused by mimo validate and mimo train before any worker
    path, _ = write_config(tmp_path, model={"preset": "tiny"}, checkpoint={"pretrained_checkpoint": str(small)})
    for command in ("validate", "train"):
        done = refused(command, str(path))
        assert done.returncode == 2 and done.stderr == f"mimo {command}: error: checkpoint.pretrained_checkpoint: " \
                                                       f"{expected}\n", done.stderr
    # load_model_only into a model with no directory for it
    config = parse_run_config({"parallelism": HOMOGENEOUS, "model": {"preset": "tiny"}})
    with pytest.raises(Exception, match="leaves out the frozen vision_encoder"):
        load_model_only(small, plan_model(config).whole_model_provider(torch.device("cpu")).provide(),
                        plan_model(config).hf_parts)


def test_export_refuses_when_the_recorded_directory_changed(runs, tmp_path):
    root, small = runs["root"], runs["small"] / "checkpoints" / "step_00000002"
    config = root / "clip" / "config.json"
    original = config.read_bytes()
    try:
        config.write_bytes(original + b"\n")
        done = refused("export-hf", str(small), str(tmp_path / "out"))
    finally:
        config.write_bytes(original)
    assert done.returncode == 2
    assert done.stderr == "mimo export-hf: error: " + refusal(small, "vision_encoder", root / "clip",
                                                             "model.vision_hf", root / "clip",
                                                             "its config.json differs") + "\n"
    assert not (tmp_path / "out").exists()


def test_export_takes_a_moved_directory_with_set_and_checks_it(runs, tmp_path):
    """A frozen part's directory moved after training (another machine, another disk): export-hf names it, and
    `--set model.vision_hf=NEW` re-points it, checked against the recorded fingerprint."""
    root, small = runs["root"], runs["small"] / "checkpoints" / "step_00000002"
    full = runs["full"] / "checkpoints" / "step_00000002"
    done = in_process("export-hf", str(full), str(tmp_path / "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    moved = tmp_path / "moved_clip"
    shutil.move(root / "clip", moved)
    try:
        done = refused("export-hf", str(small), str(tmp_path / "out"))
        assert done.returncode == 2
        assert done.stderr == "mimo export-hf: error: " + refusal(small, "vision_encoder", root / "clip",
                                                                 "model.vision_hf", root / "clip",
                                                                 "it does not exist") + "\n"
        # another directory (the language model's) is refused by its fingerprint
        done = refused("export-hf", str(small), str(tmp_path / "out"), "--set", f"model.vision_hf={root / 'llama'}")
        assert done.returncode == 2 and "is not that directory (its config.json differs)" in done.stderr
        # only where the directories are may change
        done = refused("export-hf", str(small), str(tmp_path / "out"), "--set", "model.freeze_vision_encoder=false")
        assert done.returncode == 2 and done.stderr.startswith(
            "mimo export-hf: error: --set model.freeze_vision_encoder=false: a checkpoint's run config takes only "
            "KEY=PATH with KEY one of model.hf, model.vision_hf, model.language_hf")
        # a --set the carried config cannot take is the --set's fault, not the checkpoint's
        done = refused("export-hf", str(small), str(tmp_path / "out"), "--set", "model.vision_hf=[1, 2]")
        assert done.returncode == 2 and done.stderr.startswith("mimo export-hf: error: --set model.vision_hf=[1, 2]: ")
        assert "no longer parses" not in done.stderr
        assert not (tmp_path / "out").exists()
        done = in_process("export-hf", str(small), str(tmp_path / "out"), "--set", f"model.vision_hf={moved}")
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        shutil.move(moved, root / "clip")
    exported, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "reference"))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)


def test_the_advice_names_the_setting_the_checkpoint_recorded():
    """A checkpoint trained from model.vision_hf, loaded by a run reading the tower from a whole LLaVA directory
    (model.hf): the advice is to set what the checkpoint's run set."""
    prefix = "modality_submodules.images.encoder."
    info = {HF_WEIGHTS: {"vision_encoder": {"prefix": prefix, "setting": "model.vision_hf", "directory": "/clip",
                                            "fingerprint": {"sha256": {"config.json": "a"}}}}}
    ours = HFPart("vision_encoder", prefix, "model.hf", "/", {}, omitted=True)
    with pytest.raises(CheckpointError) as caught:
        omitted_prefixes(Path("ckpt"), info, [ours])
    assert str(caught.value).endswith("set model.vision_hf to /clip or to an unchanged copy of it "
                                      "(--set model.vision_hf=PATH)")


def test_generate_from_a_directory_takes_no_set(tmp_path):
    done = refused("generate", "--hf", str(tmp_path), "--image", "x.png", "--prompt", "hi", "--set", "model.hf=x")
    assert done.returncode == 2
    assert done.stderr == ("mimo generate: error: --set model.hf=x: --set re-points a checkpoint's Hugging Face "
                           "directories; with --hf, name the directory there\n")


@pytest.mark.parametrize("source", ["full", "small"])
def test_a_frozen_part_a_pretrained_checkpoint_overwrote_is_saved(runs, from_pretrained, source):
    """A frozen part holds the weights of the pretrained checkpoint the run starts from, if that checkpoint has
    them (`full`), not its directory's: the run's checkpoints must keep it, or a resume would silently take the
    directory's weights. One the pretrained checkpoint left out too (`small`) is left out again."""
    pretrained = runs[source] / "checkpoints" / "step_00000002"
    run_dir = from_pretrained(source)
    def towers(checkpoint: Path) -> set[str]:
        return {k for k in saved_keys(checkpoint) if k.startswith(("language_model.", "modality_submodules.images."
                                                                   "encoder."))}

    saved = towers(run_dir / "checkpoints" / "step_00000002")
    assert bool(saved) == (source == "full") and saved == towers(pretrained)


def test_a_part_frozen_on_resume_keeps_the_weights_its_checkpoint_gave_it(runs, tmp_path):
    """A run that trained the language model, resumed with it frozen: the model holds the checkpoint's weights, not
    its directory's, so the resumed run's checkpoints must keep them (left out, a later resume or export would
    silently take the directory's). (Found by this session's review.)"""
    root = runs["root"]
    path, run_dir = write_config(tmp_path, model=stage1_model(root, freeze_language_model=False), data=DATA,
                                 train={"steps": 2})
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    path, _ = write_config(tmp_path, model=stage1_model(root), data=DATA)  # 4 steps, the language model frozen
    done = mimo("train", str(path), "--quiet", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = (run_dir / "checkpoints" / f"step_{s:08d}" for s in (2, 4))
    assert sorted(json.loads((after / "mimo.json").read_text())[HF_WEIGHTS]) == ["vision_encoder"]
    trained = whole_model(root, before, freeze_language_model=False)
    resumed = whole_model(root, after)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained if k.startswith("language_model."))


def test_resume_with_nothing_to_resume_starts_from_the_pretrained_checkpoint(runs, from_pretrained, tmp_path):
    """`--resume` of a run that has no checkpoint yet starts it as configured: from its pretrained checkpoint's
    weights (it once started from the model as built, silently)."""
    pretrained = runs["small"] / "checkpoints" / "step_00000002"
    path, run_dir = write_config(tmp_path, model=stage1_model(runs["root"]), data=DATA, train={"steps": 2},
                                 checkpoint={"pretrained_checkpoint": str(pretrained)})
    done = mimo("train", str(path), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0" in done.stdout
    assert f"weights from {pretrained} (optimizer, schedule and data start fresh)" in done.stdout
    got = whole_model(runs["root"], run_dir / "checkpoints" / "step_00000002")
    # the same run started fresh (not --resume)
    want = whole_model(runs["root"], from_pretrained("small") / "checkpoints" / "step_00000002")
    assert all(torch.equal(got[k], want[k]) for k in want)
