"""Checkpoints: resuming, on the same layout or another, trains on exactly as if never interrupted.

float64 on gloo, the parity test's model, batches and optimizer, 4 steps. A chain of runs, each checked
against the single-process reference (losses to a relative 1e-8, final parameters):
  A. layout #6 (images DP 2 on ranks 0-1, language TP 2 on 2-3, DDP) trains steps 1-4, saving after 2 and 4;
  B. the same layout loads A's step 2 in new processes and trains steps 3-4;
  C. colocated images DP 4 / language PP 2 × DP 2, FSDP2, loads A's step 2, trains 3-4, saving after 3 and 4;
  D. homogeneous DP 2 on a world of 2 (DDP) loads C's FSDP2 step 3 and trains step 4;
  E. layout #6 with FSDP2 (language TP 2 × FSDP: 2-D DTensors) loads A's step 2, trains 3-4, saves after 4;
  F. layout #6 with sequence parallelism (replicated norm DTensors where A saved plain tensors) loads A's
     step 2, trains 3-4, saves after 4 (loaded back into one process below).
Each distributed checkpoint loaded into one whole single-process model holds its run's final parameters.
A tied embedding split over pipeline stages, atomicity, `keep`, stub ranks and every bad checkpoint
have their own tests.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mimo.config import MimoParallelismConfig
from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.models import Decoder, DecoderConfig
from mimo.provider import MimoModelProvider, ModuleSpec
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.checkpoint import (
    HASH,
    MARKER,
    Checkpointer,
    CheckpointError,
    file_hashes,
    load_model_only,
    newest_intact,
    open_checkpoint,
)
from mimo.training.optim import OptimizerConfig
from mimo.training.step import MimoTrainer
from tests.training import test_parity
from tests.training.test_parity import (
    CLIP,
    GLOBAL_BATCH,
    IMG2_LANG_TP2,
    IMG2_LANG_TP2_SP,
    MATRIX,
    MICRO,
    OPTIM,
    TOKENS,
    dataset,
    full_params,
    modality_spec,
    provider,
)

IMAGES = ("images",)
STEPS, RTOL = 4, 1e-8
LAYOUTS = {row[0]: (row[1], row[2]) for row in MATRIX}
COLOCATED_PP2 = LAYOUTS["4-colocated-dp4-pp2dp2"][1]
HOMOGENEOUS_DP2 = LAYOUTS["1-homogeneous-dp2"][1]
SAVE_SEED = 100  # each rank seeds 100 + rank before a save: the RNG state saved is rank 0's


def all_batches() -> list:
    """The run's global batches (test_parity.batches, one step longer)."""
    data = dataset(IMAGES)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(STEPS)]


def build_trainer(layout: dict, dp_kind: str, prov: MimoModelProvider | None = None,
                  optim: OptimizerConfig = OPTIM) -> MimoTrainer:
    """The parity test's trainer for `layout`, DDP or FSDP2 on every module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = prov or provider(layout, IMAGES)
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(dp_kind)))
    return MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                       num_microbatches=MICRO, optimizer=optim, clip_grad=CLIP, activation_dtype=torch.float64)


def extra_at(step: int, layout: dict) -> dict:
    """What a run stores as `extra`: the sampler position and the layout (resolved config)."""
    return {"samples_seen": step * GLOBAL_BATCH, "layout": layout}


def train(rank: int, world: int, layout: dict, dp_kind: str, root: str, save_at: tuple[int, ...] = (),
          load: str | None = None, tied: bool = False) -> dict:
    """Load `load` if given, then train to step STEPS, saving after each step in `save_at`."""
    trainer, ckpt = build_trainer(layout, dp_kind, provider(layout, IMAGES, tied)), Checkpointer(root)
    extra, rng = None, None
    if load is not None:
        extra = ckpt.load(load, trainer)
        rng = torch.rand(4)
    batches, losses = all_batches(), []
    while trainer.step_count < STEPS:
        losses.append(trainer.train_step(batches[trainer.step_count]).loss)
        if trainer.step_count in save_at:
            torch.manual_seed(SAVE_SEED + rank)
            ckpt.save(trainer.step_count, trainer, extra_at(trainer.step_count, layout))
    return {"losses": losses, "params": full_params(trainer.model), "extra": extra,
            "rng": rng}


# -- the reference and the chain of runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference() -> tuple[list, dict]:
    """Single process, 4 steps (test_parity.reference): the losses and final parameters every run must match."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_parity, "STEPS", STEPS)
        losses, _, params = test_parity.reference(IMAGES)
    return losses, params


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> dict:
    """A: layout #6 (DDP, language TP 2) trains steps 1-4 in one run, saving after steps 2 and 4."""
    root = tmp_path_factory.mktemp("a")
    return {"root": root, "results": run_distributed(train, 4, IMG2_LANG_TP2, "ddp", str(root), (2, 4))}


@pytest.fixture(scope="module")
def run_c(tmp_path_factory, run_a) -> dict:
    """C: colocated PP 2 × DP 2 with FSDP2 loads A's step 2, trains steps 3-4, saving after 3 and 4."""
    root = tmp_path_factory.mktemp("c")
    load = str(Checkpointer(run_a["root"]).path(2))
    return {"root": root, "results": run_distributed(train, 4, COLOCATED_PP2, "fsdp", str(root), (3, 4), load)}


@pytest.fixture(scope="module")
def run_e(tmp_path_factory, run_a) -> dict:
    """E: layout #6 with FSDP2 (language TP 2 × FSDP) loads A's step 2, trains steps 3-4, saving after 4."""
    root = tmp_path_factory.mktemp("e")
    load = str(Checkpointer(run_a["root"]).path(2))
    return {"root": root, "results": run_distributed(train, 4, IMG2_LANG_TP2, "fsdp", str(root), (4,), load)}


@pytest.fixture(scope="module")
def run_f(tmp_path_factory, run_a) -> dict:
    """F: layout #6 with the language model sequence-parallel loads A's step 2, trains steps 3-4, saving after 4."""
    root = tmp_path_factory.mktemp("f")
    load = str(Checkpointer(run_a["root"]).path(2))
    return {"root": root, "results": run_distributed(train, 4, IMG2_LANG_TP2_SP, "ddp", str(root), (4,), load)}


def check_run(results: list[dict], reference: tuple[list, dict], start: int, what: str) -> float:
    """Every rank's losses from step `start` and its final parameters equal the reference; returns the
    largest relative loss difference."""
    ref_losses, ref_params = reference
    worst = 0.0
    for rank, res in enumerate(results):
        for s, (got, want) in enumerate(zip(res["losses"], ref_losses[start:], strict=True)):
            rel = abs(got - want) / abs(want)
            assert rel <= RTOL, f"{what}: rank {rank} step {start + s + 1} loss {got!r} != {want!r} ({rel:.1e})"
            worst = max(worst, rel)
        params = {single_process_name(n, ref_params): p for n, p in res["params"].items()}
        assert_matches_reference(params, ref_params, f"{what}: rank {rank} parameter", rel=RTOL)
    print(f"\n{what}: largest relative loss difference {worst:.1e}")
    return worst


def single_process_name(name: str, names) -> str:
    """A tied head on a later pipeline stage is the embedding in the single-process model."""
    return name if name in names else name.replace("lm_head", "embed_tokens")


def check_resumed(results: list[dict], step: int, saver_layout: dict) -> None:
    """Every rank got the saver's `extra` back and rank 0's RNG state at the save."""
    torch.manual_seed(SAVE_SEED)
    want_rng = torch.rand(4)
    for rank, res in enumerate(results):
        assert res["extra"] == extra_at(step, saver_layout), f"rank {rank} extra {res['extra']}"
        assert torch.equal(res["rng"], want_rng), f"rank {rank} did not restore rank 0's RNG state"


def test_a_uninterrupted_run_with_saves(run_a, reference):
    check_run(run_a["results"], reference, 0, "A: 4 steps, saving after 2 and 4")
    assert [p.name for p in Checkpointer(run_a["root"]).complete()] == ["step_00000002", "step_00000004"]


def test_b_resume_same_layout(run_a, reference):
    load = str(Checkpointer(run_a["root"]).path(2))
    results = run_distributed(train, 4, IMG2_LANG_TP2, "ddp", str(run_a["root"]) + "-b", (), load)
    check_run(results, reference, 2, "B: #6 -> #6")
    check_resumed(results, 2, IMG2_LANG_TP2)
    a_params = {n: p for res in run_a["results"] for n, p in res["params"].items()}
    check_run(results, (run_a["results"][0]["losses"], a_params), 2, "B vs A, the uninterrupted run")


def test_c_resume_tp_ddp_onto_colocated_pp_fsdp(run_c, reference):
    check_run(run_c["results"], reference, 2, "C: #6 TP2 DDP -> colocated PP2xDP2 FSDP2")
    check_resumed(run_c["results"], 2, IMG2_LANG_TP2)


def test_d_resume_fsdp_pp_onto_homogeneous_world_2(run_c, reference):
    load = str(Checkpointer(run_c["root"]).path(3))
    results = run_distributed(train, 2, HOMOGENEOUS_DP2, "ddp", str(run_c["root"]) + "-d", (), load)
    check_run(results, reference, 3, "D: colocated PP2 FSDP2 (world 4) -> homogeneous DP2 (world 2)")
    check_resumed(results, 3, COLOCATED_PP2)


def test_e_resume_tp_ddp_onto_tp_fsdp(run_e, reference):
    check_run(run_e["results"], reference, 2, "E: #6 TP2 DDP -> #6 TP2 x FSDP2")
    check_resumed(run_e["results"], 2, IMG2_LANG_TP2)


def test_f_resume_tp_onto_tp_sequence_parallel(run_f, reference):
    check_run(run_f["results"], reference, 2, "F: #6 TP2 -> #6 TP2+SP")
    check_resumed(run_f["results"], 2, IMG2_LANG_TP2)


# -- tied embeddings: the head on a later pipeline stage is saved as, and loaded from, the embedding -----------
TIED_PP2 = LAYOUTS["12-tied-pp2"][1]


def test_tied_resume_homogeneous_onto_pp2(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_parity, "STEPS", STEPS)
        losses, _, params = test_parity.reference(IMAGES, tied=True)
    first = run_distributed(train, 2, HOMOGENEOUS_DP2, "ddp", str(tmp_path), (2,), None, True)
    check_run(first, (losses, params), 0, "tied: homogeneous DP2 steps 1-2")
    load = str(Checkpointer(tmp_path).path(2))
    second = run_distributed(train, 4, TIED_PP2, "ddp", str(tmp_path), (STEPS,), load, True)
    check_run(second, (losses, params), 2, "tied: homogeneous DP2 -> images DP2 + language PP2")
    model = provider(None, IMAGES, tied=True).provide()
    load_model_only(Checkpointer(tmp_path).path(STEPS), model)
    assert_model_equals_run(model, second, "tied PP2 checkpoint")


# -- model-only loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["run_a", "run_c", "run_e", "run_f"])
def test_load_model_only_equals_the_distributed_run(run, request):
    """A whole single-process model loaded from a distributed checkpoint holds the run's final parameters."""
    done = request.getfixturevalue(run)
    model = provider(None, IMAGES).provide()
    load_model_only(Checkpointer(done["root"]).path(STEPS), model)
    assert_model_equals_run(model, done["results"], run)


def assert_model_equals_run(model: torch.nn.Module, results: list[dict], what: str) -> None:
    """Every parameter of `model` is exactly what the run's ranks hold."""
    got, seen = dict(model.named_parameters()), set()
    for res in results:
        for n, p in res["params"].items():
            name = single_process_name(n, got)
            assert torch.equal(got[name], p), f"{what}: {n} differs from the distributed run"
            seen.add(name)
    assert seen == set(got)


def test_only_tensors_are_stored_and_metadata_is_read_safely(run_a):
    """Everything DCP holds is a tensor (no pickled byte items); our own files are JSON."""
    path = Checkpointer(run_a["root"]).path(2)
    metadata, info = open_checkpoint(path)
    assert all(isinstance(m, TensorStorageMetadata) for m in metadata.state_dict_metadata.values())
    keys = set(metadata.state_dict_metadata)
    names = {n for n, _ in provider(None, IMAGES).provide().named_parameters()}
    moments = {f"optimizer.{n}.{s}" for n in names for s in ("exp_avg", "exp_avg_sq", "step")}
    assert keys == names | moments | {"rng_state"}  # single-process names: no DDP prefix, no TP pieces
    assert metadata.state_dict_metadata["language_model.layers.0.self_attn.q_proj.weight"].size == (64, 64)
    assert info["step"] == 2 and set(info["schedulers"]) == {"images", "language"}
    stored = sum(f.stat().st_size for f in path.glob("*.distcp"))  # replicas (DP, TP) are written once
    assert stored == sum(s.length for s in metadata.storage_data.values())
    assert json.loads((path / MARKER).read_text())["step"] == 2


# -- atomicity, keep, schedulers, and a checkpoint of another model ----------------------------------------------
WARMUP = OptimizerConfig(lr=1e-2, weight_decay=0.1, warmup_steps=3, total_steps=10)


def one_layer_provider(layout: dict) -> MimoModelProvider:
    """The parity model with a 1-layer language model: a different model from run A's."""
    return MimoModelProvider(ModuleSpec(Decoder, {"config": DecoderConfig.tiny(num_layers=1)}),
                             {"images": modality_spec("images")}, {"images": TOKENS["images"]},
                             MimoParallelismConfig.from_dict(layout), params_dtype=torch.float64, seed=3)


def _broken_write(self, plan, planner):
    raise OSError("disk full (simulated)")


STUB_LAYOUT = {"images": {"data_parallel_size": 1, "rank_offset": 1},  # rank 0 is a stub rank
               "language": {"data_parallel_size": 1, "rank_offset": 2}}


def snapshot(trainer: MimoTrainer) -> tuple:
    """Learning rates, schedule positions, exp_avg of every parameter and the parameters this rank holds."""
    lrs = {n: [g["lr"] for g in o.param_groups] for n, o in trainer.optimizers.items()}
    epochs = {n: s.last_epoch for n, s in trainer.schedulers.items()}
    moments = [o.state[p]["exp_avg"].clone() for o in trainer.optimizers.values() for g in o.param_groups
               for p in g["params"]]
    return lrs, epochs, moments, full_params(trainer.model)


def same(a: tuple, b: tuple) -> bool:
    """Two snapshots are equal, tensors exactly."""
    tensors_a, tensors_b = [*a[2], *a[3].values()], [*b[2], *b[3].values()]
    return a[:2] == b[:2] and a[3].keys() == b[3].keys() and len(tensors_a) == len(tensors_b) \
        and all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b, strict=True))


def atomicity(rank: int, world: int, root: str, other_model: str) -> dict:
    """Save 1; a save of 2 that fails on rank 1; 2 again, then 3 twice with keep=2; a round trip of the
    warm-up schedule and the optimizer; a bad `extra`; a checkpoint of another model. Rank 0 is a stub."""
    out: dict = {}
    trainer = build_trainer(STUB_LAYOUT, "ddp", one_layer_provider(STUB_LAYOUT), WARMUP)
    batches, ckpt = all_batches(), Checkpointer(root, keep=2)
    trainer.train_step(batches[0])
    ckpt.save(1, trainer, {})
    trainer.train_step(batches[1])
    original = FileSystemWriter.write_data
    if rank == 1:
        FileSystemWriter.write_data = _broken_write
    try:
        ckpt.save(2, trainer, {})
    except CheckpointError as e:
        out["failed_save"] = str(e)
    finally:
        FileSystemWriter.write_data = original
    out["latest_after_failure"] = ckpt.latest().name
    out["left_after_failure"] = sorted(p.name for p in Path(root).iterdir())
    torch.distributed.barrier()  # every rank has looked before rank 0's next save clears the leftover
    ckpt.save(2, trainer, {})  # clears the leftover of the failed save
    at_2 = snapshot(trainer)
    trainer.train_step(batches[2])  # moves the schedule, the optimizer and the parameters on
    ckpt.save(3, trainer, {})
    ckpt.save(3, trainer, {})  # saving a step again replaces it
    out["left_after_keep"] = sorted(p.name for p in Path(root).iterdir())
    ckpt.load(ckpt.path(2), trainer)
    out["restored"] = same(snapshot(trainer), at_2) and trainer.step_count == 2
    try:
        ckpt.save(5, trainer, {"not json": object()})
    except CheckpointError as e:
        out["bad_extra"] = str(e)
    try:
        ckpt.load(other_model, trainer)
    except CheckpointError as e:
        out["other_model"] = str(e)
    bad = Path(root) / "bad" / "step_00000002"
    if rank == 0:
        shutil.copytree(ckpt.path(2), bad)
        info = json.loads((bad / "mimo.json").read_text())
        info["schedulers"]["language"]["base_lrs"].append(0.5)
        forge(bad, "mimo.json", json.dumps(info).encode())
    torch.distributed.barrier()
    try:
        ckpt.load(bad, trainer)
    except CheckpointError as e:
        out["scheduler_groups"] = str(e)
    return out


def test_atomic_save_keep_and_other_model(run_a, tmp_path):
    other = Checkpointer(run_a["root"]).path(2)
    results = run_distributed(atomicity, 3, str(tmp_path), str(other))
    for rank, out in enumerate(results):
        assert out["failed_save"].startswith(f"saving step 2 into {tmp_path / 'step_00000002.tmp'} failed on rank(s) "
                                             "[1] (OSError: disk full (simulated)); the previous checkpoints")
        assert out["latest_after_failure"] == "step_00000001", f"rank {rank}"
        assert out["left_after_failure"] == ["step_00000001", "step_00000002.tmp"]
        assert out["left_after_keep"] == ["step_00000002", "step_00000003"]
        assert out["restored"], f"rank {rank}: parameters, optimizer, schedule or step count not restored"
        assert out["bad_extra"].startswith("extra must be JSON-serializable")
        assert out["other_model"].startswith(f"checkpoint {other} does not fit this model: unexpected keys "
                                             "language_model.layers.1.")
        assert "and 6 more" in out["other_model"]
        # 4 groups: decay / no decay, each split into DTensors and tensors (`optim.split_by_kind`)
        assert out["scheduler_groups"].endswith("does not fit this model: module 'language' has 5 optimizer "
                                                "parameter groups in the checkpoint, 4 here")
    assert not (tmp_path / "step_00000005.tmp").exists()
    assert not (tmp_path / "step_00000005").exists()


def test_latest_ignores_partial_and_temporary_directories(tmp_path):
    for name in ("step_00000001", "step_00000007", "step_00000009", "step_00000012.tmp", "notes"):
        (tmp_path / name).mkdir()
    for name in ("step_00000001", "step_00000007"):
        (tmp_path / name / MARKER).write_text("{}")
    (tmp_path / "step_00000012.tmp" / MARKER).write_text("{}")
    assert Checkpointer(tmp_path).latest() == tmp_path / "step_00000007"
    assert Checkpointer(tmp_path / "nothing").latest() is None
    with pytest.raises(CheckpointError, match="keep must be at least 1"):
        Checkpointer(tmp_path, keep=0)


# -- bad checkpoints --------------------------------------------------------------------------------------------
@pytest.fixture
def copy_a(run_a, tmp_path) -> Path:
    """A private copy of run A's step-2 checkpoint to damage."""
    dst = tmp_path / "step_00000002"
    shutil.copytree(Checkpointer(run_a["root"]).path(2), dst)
    return dst


def forge(path: Path, name: str, content: bytes) -> None:
    """Replace file `name` of checkpoint `path` and record its new size and hash in the marker: a consistent
    forgery that neither the size nor the hash check can catch, for the checks behind them."""
    (path / name).write_bytes(content)
    marker = json.loads((path / MARKER).read_text())
    marker["files"][name] = len(content)
    marker[HASH].update(file_hashes(path, [name]))
    (path / MARKER).write_text(json.dumps(marker))


def data_file(path: Path) -> Path:
    return sorted(path.glob("*.distcp"))[0]


def load_into_parity_model(path: Path, **decoder: object) -> None:
    """load_model_only into the parity model (with `decoder` config overrides)."""
    prov = provider(None, IMAGES)
    if decoder:
        prov.language_model_spec = ModuleSpec(Decoder, {"config": DecoderConfig.tiny(**decoder)})
    load_model_only(path, prov.provide())


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"^no checkpoint at .*step_00000003: the directory does not exist$"):
        load_into_parity_model(tmp_path / "step_00000003")


def test_no_marker(copy_a):
    (copy_a / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete \(no COMPLETE marker\): its save was interrupted$"):
        load_into_parity_model(copy_a)


def test_truncated_data_file(copy_a):
    f = data_file(copy_a)
    size = f.stat().st_size
    os.truncate(f, size // 2)
    with pytest.raises(CheckpointError, match=rf"is truncated or corrupt: {f.name} is {size // 2} bytes instead of "
                                              rf"{size}$"):
        load_into_parity_model(copy_a)


def test_missing_data_file(copy_a):
    f = data_file(copy_a)
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"is truncated or corrupt: {f.name} is missing$"):
        load_into_parity_model(copy_a)


def test_corrupt_metadata(copy_a):
    forge(copy_a, ".metadata", b"\x00" * (copy_a / ".metadata").stat().st_size)  # hashes match: unpickling finds out
    with pytest.raises(CheckpointError, match=r"has corrupt DCP metadata \(\.metadata\): UnpicklingError"):
        load_into_parity_model(copy_a)


class _Exploit:
    """Pickles to a call of os.system: what a tampered `.metadata` could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_metadata_is_never_executed(copy_a, tmp_path):
    pwned = tmp_path / "pwned"
    forge(copy_a, ".metadata", pickle.dumps(_Exploit(pwned)))
    with pytest.raises(CheckpointError, match=r"corrupt DCP metadata .*refusing to unpickle (posix|nt)\.system"):
        load_into_parity_model(copy_a)
    assert not pwned.exists()


def test_corrupt_json(copy_a):
    forge(copy_a, "mimo.json", b'{"format": 1, "step": ')
    with pytest.raises(CheckpointError, match=r"has a corrupt mimo\.json: Expecting value"):
        load_into_parity_model(copy_a)


def test_corrupt_marker(copy_a):
    (copy_a / MARKER).write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"step_00000002 has a corrupt COMPLETE: Expecting"):
        load_into_parity_model(copy_a)


def test_other_format(copy_a):
    info = json.loads((copy_a / "mimo.json").read_text())
    forge(copy_a, "mimo.json", json.dumps({**info, "format": 3}).encode())
    with pytest.raises(CheckpointError, match=r"step_00000002 has format 3; this mimo reads 1 or 2$"):
        load_into_parity_model(copy_a)


def test_every_file_is_hashed_by_the_ranks_that_wrote_it(run_a):
    """The marker holds a hash of every file (DCP's, written by 4 ranks, and mimo.json), and they verify."""
    path = Checkpointer(run_a["root"]).path(4)
    marker = json.loads((path / MARKER).read_text())
    assert sorted(marker[HASH]) == sorted(marker["files"]) and len(marker[HASH]) >= 4
    open_checkpoint(path, verify=True)


def test_a_swapped_shard_of_the_same_size_is_caught(run_a, tmp_path):
    """Issue 17: a shard from another checkpoint of the same size loaded silently (the marker held sizes)."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        shutil.copytree(Checkpointer(run_a["root"]).path(step), root / f"step_{step:08d}")
    newest, older = Checkpointer(root).path(4), Checkpointer(root).path(2)
    shard = data_file(newest)
    shutil.copyfile(older / shard.name, shard)  # another step's shard: same tensors, so the same size
    open_checkpoint(newest, verify=False)  # sizes alone (what the workers of a resume check) pass
    message = rf"checkpoint {newest} is corrupt: {shard.name} does not match its sha256 hash in COMPLETE"
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(newest, verify=True)
    reported: list[str] = []
    assert newest_intact(Checkpointer(root), reported.append) == older  # the previous one, with a line
    assert reported == [f"mimo train: skipping a damaged checkpoint: checkpoint {newest} is corrupt: {shard.name} "
                        f"does not match its sha256 hash in COMPLETE (changed or replaced after the save); "
                        f"resuming from {older} instead"]
    os.truncate(data_file(older), 10)  # and when none is left: the newest one's error, and that none verifies
    with pytest.raises(CheckpointError, match=rf"^{message} .*; no earlier checkpoint verifies either$"):
        newest_intact(Checkpointer(root), reported.append)


def test_the_step_is_cross_checked_with_the_directory_name(copy_a):
    """Issue 17: a step edited in mimo.json was not cross-checked (forged consistently: sizes and hashes)."""
    info = json.loads((copy_a / "mimo.json").read_text())
    forge(copy_a, "mimo.json", json.dumps({**info, "step": 7}).encode())
    with pytest.raises(CheckpointError, match=r"step_00000002 disagrees about its step \(2 in the directory name, 2 "
                                              r"in COMPLETE, 7 in mimo.json\): it was edited or moved$"):
        open_checkpoint(copy_a, verify=True)
    renamed = copy_a.rename(copy_a.with_name("step_00000009"))  # a directory renamed to another step
    forge(renamed, "mimo.json", json.dumps(info).encode())
    with pytest.raises(CheckpointError, match=r"\(9 in the directory name, 2 in COMPLETE, 2 in mimo.json\)"):
        open_checkpoint(renamed)


def test_load_model_only_refuses_a_distributed_model(copy_a):
    model = provider(None, IMAGES).provide()
    model.language_model.norm.weight._mimo_sharding = object()  # what a DDP+TP local shard carries (`mimo.ddp_shards`)
    with pytest.raises(CheckpointError, match=r"^load_model_only takes a whole, unwrapped model; use "
                                              r"Checkpointer\.load for a distributed one$"):
        load_model_only(copy_a, model)


def test_missing_keys(copy_a):
    with pytest.raises(CheckpointError, match=r"does not fit this model: missing keys "
                                              r"language_model\.layers\.2\.\S+, .* and \d+ more$"):
        load_into_parity_model(copy_a, num_layers=3)


def test_shape_mismatch(copy_a):
    with pytest.raises(CheckpointError, match=r"does not fit this model: shape mismatch "
                                              r"language_model\.embed_tokens\.weight \(256, 64\) in the checkpoint "
                                              r"vs \(512, 64\) here, language_model\.lm_head\.weight"):
        load_into_parity_model(copy_a, vocab_size=512)


def test_an_interrupted_prune_never_leaves_a_broken_complete_checkpoint(tmp_path, monkeypatch):
    # Ctrl-C can land inside the deletion of an old checkpoint: it must stop counting as complete first
    import mimo.training.checkpoint as checkpoint

    for step in (1, 2):
        path = Checkpointer(tmp_path).path(step)
        path.mkdir()
        (path / MARKER).write_text("{}")
        (path / "data.distcp").write_bytes(b"x")

    def interrupted(path, ignore_errors=False):
        (Path(path) / "data.distcp").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(tmp_path, keep=1)._prune(2)
    assert [p.name for p in Checkpointer(tmp_path).complete()] == ["step_00000002"]
    monkeypatch.undo()
    Checkpointer(tmp_path, keep=1)._prune(2)  # the next save's prune clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
