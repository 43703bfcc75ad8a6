"""mimo.torch_compat: the mends for older torch releases, checked on whatever torch runs the suite, and the
tripwires of DCP's unsafe reading (`SafeReader`, `SafePlanner`).

The bug itself lives in torch 2.11 (the GPU machine's) and CI runs a later torch, where the mend stands aside; so
the mend's own logic is checked here with the later torch's fix hidden. On 2.11 the sequence-parallel tests
(13 text tokens and a ViT's 17 over TP2: uneven shards) fail without it.
"""

from __future__ import annotations

import datetime
import inspect
import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.tensor import _redistribute
from torch.distributed.tensor.placement_types import Shard

from mimo.torch_compat import DCP_METADATA, SafePlanner, SafeReader, contiguous_uneven_gathers, storage_files


def test_an_uneven_gather_is_narrowed_to_a_contiguous_tensor_where_torch_lacks_the_fix(monkeypatch):
    monkeypatch.delattr(_redistribute, "NestedRedistribute", raising=False)
    monkeypatch.setattr(Shard, "_maybe_unpad_tensor", Shard._maybe_unpad_tensor)  # put back after the test
    contiguous_uneven_gathers()
    contiguous_uneven_gathers()  # once is enough: a second call does not wrap the mend again
    assert Shard._maybe_unpad_tensor.mimo_contiguous
    gathered = torch.arange(2 * 14 * 3, dtype=torch.float64).reshape(2, 14, 3)  # 13 tokens over 2 ranks, padded
    out = Shard(1)._maybe_unpad_tensor(gathered, 13, 2)
    assert out.shape == (2, 13, 3) and out.is_contiguous() and torch.equal(out, gathered[:, :13])
    even = torch.zeros(2, 14, 3)
    assert Shard(1)._maybe_unpad_tensor(even, 14, 2) is even  # nothing padded: no copy


def test_torch_with_the_fix_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(_redistribute, "NestedRedistribute", object(), raising=False)
    before = Shard._maybe_unpad_tensor
    monkeypatch.setattr(Shard, "_maybe_unpad_tensor", before)
    contiguous_uneven_gathers()
    assert Shard._maybe_unpad_tensor is before


# -- reading DCP checkpoints without running them (SafeReader, SafePlanner) ---------------------------------------
def dcp_checkpoint(path: Path, state: dict) -> Path:
    """`state` written by DCP itself in one process (a tensor, and a bytes entry: what mimo never writes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP notes that it saves in a single process
        dcp.save(state, storage_writer=FileSystemWriter(path), no_dist=True)
    return path


def test_torch_still_unpickles_the_metadata_and_the_safe_reader_reads_what_it_writes(tmp_path):
    """Tripwire: torch 2.13's reader is a plain `pickle.load` of `.metadata` (any global is built: here a date), so
    `SafeReader` must stand in for it; the day torch reads it safely, this fails and `SafeReader` may go. And
    `SafeReader` reads DCP's own metadata (its file name and classes) as torch does."""
    path = dcp_checkpoint(tmp_path / "ckpt", {"weight": torch.arange(6.0), "blob": io.BytesIO(b"x")})
    ours, theirs = SafeReader(path).read_metadata(), FileSystemReader(path).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.storage_data == theirs.storage_data
    assert storage_files(ours) == {"__0_0.distcp": ()}
    assert isinstance(ours.state_dict_metadata["blob"], BytesStorageMetadata)  # DCP can write bytes entries
    theirs.planner_data = datetime.date(2026, 1, 1)
    (path / DCP_METADATA).write_bytes(pickle.dumps(theirs))
    assert FileSystemReader(path).read_metadata().planner_data == datetime.date(2026, 1, 1)
    with pytest.raises(pickle.UnpicklingError, match=r"^refusing to unpickle datetime\.date$"):
        SafeReader(path).read_metadata()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_the_safe_planner_loads_bytes_entries_with_weights_only(tmp_path):
    """Tripwire: torch's `DefaultLoadPlanner.load_bytes` unpickles a bytes entry with `weights_only=False` (it would
    run the payload); `SafePlanner` loads plain values from one and refuses the payload unrun."""
    ran = tmp_path / "ran"
    state = {"weight": torch.arange(6.0), "plain": 3, "evil": _Payload(ran)}
    path = dcp_checkpoint(tmp_path / "ckpt", state)  # DCP pickles what is not a tensor into a bytes entry
    state = {"weight": torch.zeros(6), "plain": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=True)
        assert torch.equal(state["weight"], torch.arange(6.0)) and state["plain"] == 3
        with pytest.raises(CheckpointException, match=r"Unsupported global: GLOBAL (builtins|io)\.open"):
            dcp.load({"evil": None}, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=True)
    assert not ran.exists()
    assert "weights_only=False" in inspect.getsource(DefaultLoadPlanner.load_bytes)  # torch's, still unsafe


def test_the_compiler_switches_mimo_sets_are_where_torch_keeps_them():
    """`compiler_loaded` names dynamo's module (torch.compile imports it) and inductor still has the switch
    `emulate_precision_casts` sets: a torch that moves either fails here, not silently in a run."""
    import torch._inductor.config as inductor

    from mimo.torch_compat import compiler_loaded, emulate_precision_casts

    torch.compile(lambda x: x)  # builds the wrapper: dynamo imported, nothing compiled yet
    assert compiler_loaded()
    saved = inductor.emulate_precision_casts
    try:
        emulate_precision_casts()
        assert inductor.emulate_precision_casts is True
    finally:
        inductor.emulate_precision_casts = saved
