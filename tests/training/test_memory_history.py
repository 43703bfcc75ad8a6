"""`log.memory_snapshot` (`mimo.training.memory_history`): the peak of a recorded allocator trace and who held it,
the refusals, and the private torch functions it calls (this file fails when torch moves them).

The traces here are written by hand in the format torch documents for `torch.cuda.memory._snapshot()`: no CPU
records a CUDA allocator. The recording itself runs in tests/gpu/test_memory_history_gpu.py."""

from __future__ import annotations

import inspect
import os
from unittest import mock

import pytest
import torch
import yaml

from mimo.fork_safe import NVML_CHECK
from mimo.training.memory_history import BEFORE, NO_FRAME, MemoryHistory, PeakReport, holder, peak_holders
from tests.test_train_cli import in_process

OURS = "/work/src/mimo/models/decoder.py"
TORCH_FILE = os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "linear.py")


def frames(*files: str) -> list[dict]:
    """A stack, innermost first, of (file, line 1, function f)."""
    return [{"filename": f, "line": 1, "name": "f"} for f in files]


def alloc(addr: int, size: int, where: str = OURS) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "stream": 0, "frames": frames(TORCH_FILE, where)}


def free(addr: int, size: int) -> list[dict]:
    return [{"action": a, "addr": addr, "size": size, "stream": 0, "frames": []}
            for a in ("free_requested", "free_completed")]


def snapshot(trace: list[dict], blocks: list[dict] = ()) -> dict:
    """Device 0's trace and one segment holding `blocks` (its allocated and free pieces at the snapshot)."""
    return {"device_traces": [trace], "segments": [{"device": 0, "address": 0, "total_size": 1 << 30, "stream": 0,
                                                    "blocks": list(blocks)}]}


def test_the_peak_is_the_most_bytes_allocated_at_once_and_its_holders_are_who_held_them_then():
    trace = [alloc(100, 10, "/a.py"), alloc(200, 30, "/b.py"), *free(100, 10), alloc(300, 25, "/a.py"),
             *free(200, 30), *free(300, 25), alloc(400, 50, "/c.py")]  # totals 10, 40, 30, 55, 25, 0, 50
    report = peak_holders(snapshot(trace), 0)
    assert report.peak_bytes == 55
    assert report.holders == {"/b.py:1 f": [30, 1], "/a.py:1 f": [25, 1]}
    assert trace[report.event]["addr"] == 300 and report.events == len(trace)  # the alloc of 300 reached it


def test_blocks_from_before_the_recording_count_from_its_start():
    """One freed during the trace (its first event a free), one still allocated at the snapshot (no event): both
    held memory before the first recorded event."""
    trace = [alloc(100, 10), *free(500, 40), alloc(200, 5)]
    blocks = [{"address": 600, "size": 7, "state": "active_allocated", "frames": []},
              {"address": 200, "size": 5, "state": "active_allocated", "frames": []},
              {"address": 700, "size": 99, "state": "inactive", "frames": []}]
    report = peak_holders(snapshot(trace, blocks), 0)
    assert report.peak_bytes == 40 + 7 + 10  # after the first alloc, before the free of 500
    assert report.holders == {BEFORE: [47, 2], f"{OURS}:1 f": [10, 1]}


def test_a_peak_before_any_recorded_allocation_is_the_start():
    trace = [*free(500, 40), alloc(100, 10)]
    report = peak_holders(snapshot(trace), 0)
    assert (report.peak_bytes, report.event, report.holders) == (40, -1, {BEFORE: [40, 1]})


def test_the_holder_is_the_innermost_frame_outside_torch():
    assert holder(frames(TORCH_FILE, "/x/torchao/float8/cast.py", OURS)) == "/x/torchao/float8/cast.py:1 f"
    generated = "/tmp/torchinductor_me/ab/cabc.py"  # inductor's code: the compiled block's line in mimo is the holder
    assert holder(frames(TORCH_FILE, generated, TORCH_FILE, OURS)) == f"{OURS}:1 f"
    assert holder(frames(TORCH_FILE, generated, TORCH_FILE)) == f"{generated}:1 f"
    assert holder(frames(TORCH_FILE)) == f"{TORCH_FILE}:1 f"
    assert holder([]) == NO_FRAME


def test_the_report_ranks_holders_and_sums_the_rest():
    report = PeakReport(3_000_000_000, 9, 10, {"a": [2_000_000_000, 3], "b": [600_000_000, 1], "c": [400_000_000, 2]})
    lines = report.lines(top=2)
    assert lines[0] == "peak 3.00 GB allocated, at event 10 of 10 recorded"
    assert [line.split()[-1] for line in lines[1:]] == ["a", "b", "holders)"]
    assert lines[-1].split()[:3] == ["0.400", "GB", "2"]


def _run_yaml(tmp_path, step: int) -> str:
    """A two-step run on one rank asking for the snapshot after `step`."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"parallelism": {"images": {"data_parallel_size": 1},
                                                    "language": {"data_parallel_size": 1}},
                                    "train": {"steps": 2}, "log": {"memory_snapshot": step}}))
    return str(path)


@pytest.mark.parametrize("cuda", [False, True])
def test_a_step_past_the_run_is_refused_in_one_line(tmp_path, cuda):
    with mock.patch.object(torch.cuda, "is_available", return_value=cuda):  # the rule holds with a GPU or not
        done = in_process("validate", _run_yaml(tmp_path, 3))
    assert done.returncode == 2 and done.stderr == ("mimo validate: error: log.memory_snapshot: step 3 is past the "
                                                    "run's last (train.steps 2); ask for a step up to it, or 0 (off)\n")


def test_a_machine_without_cuda_is_refused_before_any_worker_and_one_with_cuda_is_not(tmp_path):
    """`mimo validate` (`plan_run`, as `mimo train`'s parent) on one line; CUDA's availability mocked either way
    (no GPU here, nor a recording: that is tests/gpu/test_memory_history_gpu.py)."""
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        done = in_process("validate", _run_yaml(tmp_path, 1))
    assert done.returncode == 2 and done.stderr == ("mimo validate: error: log.memory_snapshot: 1 records the CUDA "
                                                    "allocator, and this machine has no CUDA GPU; set "
                                                    "log.memory_snapshot: 0\n")
    asked = []  # how each check asked: through NVML, or by initializing CUDA (a forked worker then dies)
    with mock.patch.object(torch.cuda, "is_available", side_effect=lambda: asked.append(os.environ.get(NVML_CHECK))
                           or True):
        assert in_process("validate", _run_yaml(tmp_path, 2)).returncode == 0
    assert asked and set(asked) == {"1"} and NVML_CHECK not in os.environ


class FakeAllocator:
    """Stands in for the CUDA allocator's recording, which cannot exist without a GPU: what `MemoryHistory` asks
    of `torch.cuda.memory`, and a snapshot of one allocation."""

    def __init__(self):
        self.calls = []

    def record(self, enabled="all", **kwargs):
        self.calls.append(enabled)
        if enabled is not None:
            self.settings = kwargs

    def snapshot(self):
        return snapshot([alloc(100, 2_000_000_000)])

    def patched(self):
        return mock.patch.multiple(torch.cuda.memory, _record_memory_history=self.record, _snapshot=self.snapshot)


def test_the_history_is_written_after_the_asked_step_only_and_recording_ends(tmp_path, capsys):
    fake = FakeAllocator()
    with fake.patched():
        memory = MemoryHistory(2, tmp_path, 0, torch.device("cuda", 0))
        memory.start()
        with memory.watching():
            memory.after_step(1)
            assert not (tmp_path / "memory").exists()
            memory.after_step(2)
    assert fake.calls == ["all", None]  # recorded from the start, stopped once written
    # Python stacks of allocations only: stacks of frees crash compiled blocks recomputed in the backward (torch 2.11)
    assert fake.settings["context"] == "alloc" and fake.settings["stacks"] == "python"
    assert (tmp_path / "memory" / "rank0.txt").read_text().splitlines() == [
        "GPU memory of rank 0 after step 2, recorded from the run's start",
        "peak 2.00 GB allocated, at event 1 of 1 recorded", f"    2.000 GB       1 blocks  {OURS}:1 f"]
    assert (tmp_path / "memory" / "rank0.pickle").stat().st_size > 0
    assert capsys.readouterr().out.startswith(f"memory snapshot after step 2: {tmp_path}/memory/rank*.pickle")


def test_an_out_of_memory_error_writes_the_history_and_goes_on(tmp_path):
    fake = FakeAllocator()
    with fake.patched(), pytest.raises(torch.OutOfMemoryError):
        memory = MemoryHistory(5, tmp_path, 1, torch.device("cuda", 0))
        memory.start()
        with memory.watching():
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert fake.calls == ["all", None]
    assert (tmp_path / "memory" / "rank1.txt").read_text().startswith("GPU memory of rank 1 at an out-of-memory")


def test_a_run_resumed_at_or_after_the_asked_step_records_nothing(tmp_path, capsys):
    fake = FakeAllocator()
    with fake.patched():
        for resumed, calls in ((1, ["all"]), (2, ["all", None])):
            memory = MemoryHistory(2, tmp_path, 0, torch.device("cuda", 0))
            memory.start()
            memory.resumed_at(resumed)
            assert fake.calls == calls and memory.recording == (resumed < 2)
            memory.stop()
            fake.calls.clear()
    assert capsys.readouterr().out == ("log.memory_snapshot: step 2 is not after the resumed step 2; nothing is "
                                       "recorded\n")


def test_nothing_is_recorded_when_not_asked_or_on_a_cpu(tmp_path):
    fake = FakeAllocator()
    with fake.patched():
        for step, device in ((0, torch.device("cuda", 0)), (2, torch.device("cpu"))):
            memory = MemoryHistory(step, tmp_path, 0, device)
            memory.start()
            with memory.watching():
                memory.after_step(2)
    assert fake.calls == [] and not (tmp_path / "memory").exists()


def test_torch_still_has_the_private_functions_this_module_calls():
    """`_record_memory_history(enabled=..., context=..., stacks=..., max_entries=...)` and `_snapshot()`, as
    torch's "Understanding CUDA Memory Usage" documents them: if torch renames them, this fails, not a GPU run."""
    record = inspect.signature(torch.cuda.memory._record_memory_history).parameters
    assert {"enabled", "context", "stacks", "max_entries"} <= set(record)
    assert callable(torch.cuda.memory._snapshot)
    assert torch.OutOfMemoryError is torch.cuda.OutOfMemoryError  # what `watching` catches
