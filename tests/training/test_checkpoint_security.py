"""The probe of issue 27: loading a checkpoint never executes code from it, whatever its files say.

A tiny checkpoint of one process (the parity model, AdamW state, the RNG state) is forged consistently (sizes and
hashes in COMPLETE rewritten, as anyone who can write the directory can) in every way a pickle could ride in:
  - DCP's `.metadata` marks an entry of each kind (a parameter, an optimizer state, the RNG state) as bytes, pointing
    at a pickle appended to the data file: torch's own planner would `torch.load(weights_only=False)` it;
  - a tensor entry whose record is a pickle (DCP reads records with `weights_only=True`), or a data file that is one;
  - `.metadata` itself a pickle with a payload; `mimo.json` and `COMPLETE` holding one (they are read as JSON).
Each payload would create a file if it ran. Every loader refuses in one line and no file appears. Re-run the probe
with `python -m pytest -o addopts="" tests/training/test_checkpoint_security.py`.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import pickle
import shutil
import types
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import mimo.training.checkpoint as checkpoint
from mimo.torch_compat import SafeReader
from mimo.training.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    check_weights_fit,
    load_model_only,
    newest_intact,
)
from tests.test_train_cli import refused
from tests.training.test_checkpoint import forge
from tests.training.test_parity import provider

pytestmark = pytest.mark.filterwarnings("ignore:.*in a single process")  # DCP's note: one process is the point
IMAGES = ("images",)
PARAMETER, MOMENT, RNG = "language_model.norm.weight", "optimizer.language_model.norm.weight.exp_avg", "rng_state"
DATA = "__0_0.distcp"


class Payload:
    """Pickles to `open(marker, "w")`: run, it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def tiny_trainer() -> types.SimpleNamespace:
    """What a checkpoint saves of a trainer, in one process: the parity model and AdamW state of its language model."""
    model = provider(None, IMAGES).provide()
    optimizer = torch.optim.AdamW(model.language_model.parameters())
    for p in model.language_model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return types.SimpleNamespace(model=model, optimizers={"language": optimizer}, schedulers={}, step_count=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny step-2 checkpoint, written once for the module."""
    return Checkpointer(tmp_path_factory.mktemp("tiny")).save(2, tiny_trainer(), {})


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to forge."""
    return Path(shutil.copytree(saved, tmp_path / "checkpoints" / saved.name))


def append(path: Path, name: str, record: bytes) -> int:
    """Append `record` to file `name` of checkpoint `path` (sizes and hashes rewritten); its offset there."""
    offset = (path / name).stat().st_size
    forge(path, name, (path / name).read_bytes() + record)
    return offset


def forge_metadata(path: Path, key: str, as_bytes: bool, record: bytes) -> None:
    """Point entry `key` of `.metadata` at `record` (appended to the data file), marked as bytes if `as_bytes`."""
    metadata = SafeReader(path).read_metadata()
    offset = append(path, DATA, record)
    (index, info), *_ = [(i, s) for i, s in metadata.storage_data.items() if i.fqn == key]
    if as_bytes:
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        del metadata.storage_data[index]
        index = MetadataIndex(key)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(record))
    forge(path, ".metadata", pickle.dumps(metadata))


def load_everything(path: Path) -> None:
    """Every loader of a checkpoint: `--resume`'s (parameters, optimizer state, RNG state), a whole model's
    (`export-hf`, `generate`, evaluation) and a pretrained checkpoint's check."""
    Checkpointer(path.parent).load(path, tiny_trainer())
    load_model_only(path, provider(None, IMAGES).provide())
    check_weights_fit(path, provider(None, IMAGES).provide())


def refused_by_every_loader(path: Path, pattern: str, in_the_data: bool = False) -> None:
    """Every loader raises one line matching `pattern`, naming the checkpoint (for a forgery `in_the_data`, those
    that read the data: a pretrained checkpoint's check reads its metadata, and the data's hashes, which match)."""
    loaders = [lambda: Checkpointer(path.parent).load(path, tiny_trainer()),
               lambda: load_model_only(path, provider(None, IMAGES).provide())]
    if not in_the_data:
        loaders.append(lambda: check_weights_fit(path, provider(None, IMAGES).provide()))
    for load in loaders:
        with pytest.raises(CheckpointError, match=pattern) as e:
            load()
        assert "\n" not in str(e.value) and str(e.value).startswith(f"checkpoint {path}")


def test_the_tiny_checkpoint_loads_in_every_loader(ckpt):
    load_everything(ckpt)


@pytest.mark.parametrize("key", [PARAMETER, MOMENT, RNG])
def test_a_bytes_entry_of_each_kind_is_refused_before_loading(ckpt, tmp_path, key):
    """Issue 27, bad 1: `rng_state` marked as bytes, pointing at a pickle, ran the pickle on `--resume`."""
    ran = tmp_path / "ran"
    forge_metadata(ckpt, key, as_bytes=True, record=pickle.dumps(Payload(ran)))
    refused_by_every_loader(ckpt, rf"was not written so by mimo \('{key}' is stored as BytesStorageMetadata where "
                                  r"mimo writes a tensor\); refused before loading anything$")
    assert not ran.exists()


def test_a_tensor_record_that_is_a_pickle_is_refused(ckpt, tmp_path):
    ran = tmp_path / "ran"
    record = io.BytesIO()
    torch.save(Payload(ran), record)
    forge_metadata(ckpt, PARAMETER, as_bytes=False, record=record.getvalue())
    refused_by_every_loader(ckpt, r"could not be read on rank\(s\) \[0\] \(not a tensor record; weights_only "
                                  r"refused it, nothing run: Unsupported global: GLOBAL (builtins|io)\.open .*\): "
                                  r"it is corrupt$", in_the_data=True)
    assert not ran.exists()


@pytest.mark.parametrize("name", [".metadata", DATA, "mimo.json", MARKER])
def test_a_pickle_in_place_of_any_file_is_never_run(ckpt, tmp_path, name):
    ran = tmp_path / "ran"
    payload = pickle.dumps(Payload(ran))
    if name == MARKER:
        (ckpt / MARKER).write_bytes(payload)
    else:
        forge(ckpt, name, payload)
    expected = {".metadata": r"has corrupt DCP metadata \(\.metadata\): UnpicklingError: refusing to unpickle "
                             r"(builtins|io)\.open$",
                DATA: r"could not be read on rank\(s\) \[0\] \(EOFError: \): it is corrupt$",  # records past its end
                "mimo.json": r"has a corrupt mimo\.json: ", MARKER: r"has a corrupt COMPLETE: "}[name]
    refused_by_every_loader(ckpt, expected, in_the_data=name == DATA)
    assert not ran.exists()


def test_metadata_may_read_only_the_checkpoints_own_files(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.distcp"
    shutil.copyfile(ckpt / DATA, outside)
    metadata = SafeReader(ckpt).read_metadata()
    index = next(i for i in metadata.storage_data if i.fqn == PARAMETER)
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=str(outside))
    forge(ckpt, ".metadata", pickle.dumps(metadata))
    refused_by_every_loader(ckpt, rf"\(\.metadata reads from '{outside}', which is not one of the checkpoint's data "
                                  r"files\); refused before loading anything$")


# -- every reader verifies the hashes (issue 27, bad 3) ---------------------------------------------------------
def test_every_reader_checks_the_hashes_and_a_damaged_header_is_one_line(ckpt, tmp_path):
    data = bytearray((ckpt / DATA).read_bytes())
    at = next(info.offset for i, info in SafeReader(ckpt).read_metadata().storage_data.items() if i.fqn == PARAMETER)
    data[at:at + 4] = b"JUNK"  # the zip header of a parameter's record, the size unchanged
    (ckpt / DATA).write_bytes(bytes(data))
    hashes = rf"^checkpoint {ckpt} is corrupt: {DATA} does not match its sha256 hash in COMPLETE"
    with pytest.raises(CheckpointError, match=hashes):  # `checkpoint.pretrained_checkpoint` (`plan_run`)
        check_weights_fit(ckpt, provider(None, IMAGES).provide())
    with pytest.raises(CheckpointError, match=hashes):  # a whole model's load
        load_model_only(ckpt, provider(None, IMAGES).provide())
    for command in (["export-hf", str(ckpt), str(tmp_path / "out")],
                    ["generate", "--checkpoint", str(ckpt), "--image", "x.png", "--prompt", "x"]):
        done = refused(*command)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"mimo {command[0]}: error: checkpoint {ckpt} is corrupt: {DATA} does not "
                                      f"match its sha256"), done.stderr
    forge(ckpt, DATA, bytes(data))  # hashes that match the damage: the header itself is found bad, in one line
    refused_by_every_loader(ckpt, r"could not be read on rank\(s\) \[0\] \(not a tensor record; weights_only "
                                  r"refused it, nothing run: Unsupported operand 0\): it is corrupt$", in_the_data=True)


# -- retention after a fall-back, a full disk (issue 27, weak) ----------------------------------------------------
def test_a_fall_back_keeps_the_intact_checkpoint_and_sets_the_damaged_one_aside(tmp_path, capsys):
    trainer, root = tiny_trainer(), tmp_path / "checkpoints"
    ckpts = Checkpointer(root, keep=2)
    for step in (20, 40):
        ckpts.save(step, trainer, {})
    damaged = ckpts.path(40)
    (damaged / DATA).write_bytes(bytes(reversed((damaged / DATA).read_bytes())))
    assert newest_intact(ckpts, lambda line: None) == ckpts.path(20)
    ckpts.load(ckpts.path(20), trainer)
    ckpts.save(30, trainer, {})
    assert [p.name for p in ckpts.complete()] == ["step_00000020", "step_00000030"]
    assert (root / "step_00000040.skipped").is_dir()
    assert ("mimo train: set step_00000040 aside as step_00000040.skipped (a later step than this run's 30: a resume "
            "skipped it as damaged); it is never loaded or deleted\n") in capsys.readouterr().out
    ckpts.save(50, trainer, {})
    assert [p.name for p in ckpts.complete()] == ["step_00000030", "step_00000050"]


def test_a_full_disk_is_named_in_one_line(tmp_path, monkeypatch):
    """The write is mocked to fail as a full disk does (ENOSPC; torch's zip writer says 'unexpected pos' instead,
    seen with the free space then left): no disk is filled here."""
    trainer, root = tiny_trainer(), tmp_path / "checkpoints"

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(root).save(2, trainer, {})
    assert str(e.value).startswith(f"saving step 2 into {root / 'step_00000002.tmp'} failed (no space left on {root}: ")
    assert str(e.value).endswith(" MiB free); the previous checkpoints are untouched") and "\n" not in str(e.value)

    def unexpected_pos(self, plan, planner):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 704 vs 598")

    monkeypatch.setattr(FileSystemWriter, "write_data", unexpected_pos)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))  # a full disk
    with pytest.raises(CheckpointError, match=rf"failed \(no space left on {root}: 0 MiB free\); the previous"):
        Checkpointer(root).save(2, trainer, {})

