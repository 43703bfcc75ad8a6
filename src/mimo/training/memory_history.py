"""`log.memory_snapshot`: the GPU allocator's history, and who held the memory at its peak or at an out-of-memory.

torch records every allocation of the CUDA caching allocator with the Python stack that made it
(`torch.cuda.memory._record_memory_history`, documented in torch's "Understanding CUDA Memory Usage" though its
name is private: this is the only module that calls it, and tests/training/test_memory_history.py fails when torch
moves it). Recording starts before the model is built, so weights, gradients and optimizer state are attributed
too. After the asked step, or at an out-of-memory error, each GPU rank writes to the run directory's `memory/`:
`rank{r}.pickle`, torch's snapshot for https://pytorch.org/memory_viz, and `rank{r}.txt`, the live bytes at the
recorded peak grouped by the innermost frame outside torch that allocated them (`peak_holders`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# the recorded allocator events kept (a ring: older ones are dropped); a 7B step makes ~10^5
MAX_ENTRIES = 1_000_000
# the stack of each allocation only: frees' stacks are not needed here, and recording them crashes a compiled block
# recomputed in the backward on torch 2.11 ("returned NULL without setting an exception", pytorch/pytorch#179536)
CONTEXT = "alloc"
BEFORE = "(allocated before the recording)"
NO_FRAME = "(no Python frame: autograd's backward thread, or C++)"
TORCH_DIR = os.path.dirname(torch.__file__)
Live = dict[int, tuple[int, list[dict[str, Any]] | None]]  # address: (bytes, frames; None: before the recording)


@dataclass
class PeakReport:
    """The most bytes the recording saw allocated at once, and who held them then (bytes and blocks by holder)."""

    peak_bytes: int
    event: int  # the trace event that reached the peak (-1: before any recorded event)
    events: int
    holders: dict[str, list[int]] = field(default_factory=dict)  # holder: [bytes, blocks]

    def lines(self, top: int = 15) -> list[str]:
        """The report as text: the peak, then the `top` largest holders."""
        out = [f"peak {self.peak_bytes / 1e9:.2f} GB allocated, at event {self.event + 1} of {self.events} recorded"]
        ranked = sorted(self.holders.items(), key=lambda kv: -kv[1][0])
        for holder, (size, blocks) in ranked[:top]:
            out.append(f"{size / 1e9:9.3f} GB {blocks:7d} blocks  {holder}")
        rest = ranked[top:]
        if rest:
            out.append(f"{sum(v[0] for _, v in rest) / 1e9:9.3f} GB {sum(v[1] for _, v in rest):7d} blocks  "
                       f"({len(rest)} more holders)")
        return out


def holder(frames: list[dict[str, Any]]) -> str:
    """Where a block was allocated: its innermost frame outside torch's package and inductor's generated code
    (mimo's, torchao's, the user's), else outside torch's package, else the innermost. The backward's blocks are
    allocated on autograd's own thread, which runs no Python of ours: they often have no frame at all."""
    outside = [f for f in frames if not f["filename"].startswith(TORCH_DIR)]
    ours = [f for f in outside if "torchinductor" not in f["filename"]]
    f = (ours or outside or frames or [None])[0]
    return NO_FRAME if f is None else f"{f['filename']}:{f['line']} {f['name']}"


def peak_holders(snapshot: dict[str, Any], device: int) -> PeakReport:
    """Replay `device`'s recorded trace: the peak of the bytes allocated, and each holder's bytes at that moment.
    Blocks allocated before the recording (or before the ring's oldest event) count from the start: those freed
    during it, and those still allocated at the snapshot."""
    trace = snapshot["device_traces"][device]
    first: dict[int, dict[str, Any]] = {}  # each address's first recorded alloc or free
    for e in trace:
        if e["action"] in ("alloc", "free_completed"):
            first.setdefault(e["addr"], e)
    start: Live = {addr: (e["size"], None) for addr, e in first.items() if e["action"] == "free_completed"}
    for seg in snapshot["segments"]:  # allocated before the trace and never freed
        if seg["device"] == device:
            for b in seg["blocks"]:
                if b["state"] != "inactive" and b["address"] not in first:
                    start[b["address"]] = (b["size"], None)
    live = dict(start)
    total = sum(size for size, _ in live.values())
    peak, at = total, -1
    for i, e in enumerate(trace):
        total += _apply(live, e)
        if total > peak:
            peak, at = total, i
    live = dict(start)
    for e in trace[:at + 1]:  # again, to the peak: the blocks live then
        _apply(live, e)
    holders: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        who = holder(frames) if frames is not None else BEFORE
        holders[who][0] += size
        holders[who][1] += 1
    return PeakReport(peak, at, len(trace), dict(holders))


def _apply(live: Live, event: dict[str, Any]) -> int:
    """One trace event applied to the live blocks; the bytes it allocated (freed: negative)."""
    if event["action"] == "alloc":
        live[event["addr"]] = (event["size"], event["frames"])
        return event["size"]
    if event["action"] == "free_completed" and event["addr"] in live:
        return -live.pop(event["addr"])[0]
    return 0


class MemoryHistory:
    """Records this rank's GPU allocator from `start()` and writes the snapshot and its peak report after step
    `step` (0: never) or when an out-of-memory error leaves `watching()`; nothing on a CPU run."""

    def __init__(self, step: int, run_dir: Path, rank: int, device: torch.device):
        self.step, self.dir, self.rank, self.device = step, run_dir / "memory", rank, device
        self.recording = False

    def start(self) -> None:
        """Begin recording, with Python stacks (mimo's lines), if asked and on a GPU."""
        if self.step and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled="all", context=CONTEXT, stacks="python",
                                                     max_entries=MAX_ENTRIES)
            self.recording = True

    def resumed_at(self, step: int) -> None:
        """A resumed run starts after `step`: at or past the asked one, nothing is recorded (rank 0 says so)."""
        if self.recording and step >= self.step:
            self.stop()
            if self.rank == 0:
                print(f"log.memory_snapshot: step {self.step} is not after the resumed step {step}; nothing is "
                      f"recorded", flush=True)

    def after_step(self, step: int) -> None:
        """Write the snapshot after the asked step, and stop recording."""
        if self.recording and step == self.step:
            self._write(f"after step {step}")

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Training inside: an out-of-memory error writes the snapshot (while recording) before it goes on."""
        try:
            yield
        except torch.OutOfMemoryError:
            if self.recording:
                self._write("at an out-of-memory error")
            raise
        finally:
            self.stop()

    def stop(self) -> None:
        """End recording (its history is dropped)."""
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def _write(self, when: str) -> None:
        """`rank{r}.pickle` (torch's snapshot) and `rank{r}.txt` (its peak's holders); rank 0 names them."""
        snapshot = torch.cuda.memory._snapshot()
        self.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"rank{self.rank}.pickle", "wb") as f:
            pickle.dump(snapshot, f)
        report = peak_holders(snapshot, self.device.index or 0)
        text = [f"GPU memory of rank {self.rank} {when}, recorded from the run's start", *report.lines()]
        (self.dir / f"rank{self.rank}.txt").write_text("\n".join(text) + "\n")
        if self.rank == 0:
            print(f"memory snapshot {when}: {self.dir}/rank*.pickle (https://pytorch.org/memory_viz), the peak's "
                  f"holders in rank*.txt; rank 0: {report.lines(0)[0]}", flush=True)
