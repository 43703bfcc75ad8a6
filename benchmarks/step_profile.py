"""One training step under the PyTorch profiler, boiled down to where the GPU's time went.

Used by `deployments.py` for mimo's and Hugging Face's rows alike. From the kernels the profiler records on
this rank's GPU it reports: the step's wall time; the time some kernel runs (busy) and the rest (idle: the
GPU waits for the host or for another rank); compute, communication (NCCL kernels) and copy time, each as
the union of its kernels' intervals; the communication that no compute kernel overlaps (exposed); and the
kernels that take the most time. `--trace` keeps the Chrome trace (gzip) for a closer look.
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

Interval = tuple[float, float]


def profile_step(step: Callable[[], Any], trace: Path | None = None, top: int = 12) -> dict[str, Any]:
    """Run `step` once under the profiler (synchronized before and after); the summary of its GPU time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [(e.name, e.time_range.start / 1e3, e.time_range.end / 1e3) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]  # not spans
    summary = summarize_kernels(kernels, wall_ms, top)
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        summary["trace"] = trace.name
    return summary


def kind_of(name: str) -> str:
    """compute, comm (NCCL) or copy, from a kernel's name."""
    lowered = name.lower()
    if "nccl" in lowered:
        return "comm"
    if lowered.startswith(("memcpy", "memset")) or "copy" in lowered and "elementwise" not in lowered:
        return "copy"
    return "compute"


def summarize_kernels(kernels: list[tuple[str, float, float]], wall_ms: float, top: int) -> dict[str, Any]:
    """Busy, idle, per-kind and exposed-communication milliseconds, and the `top` kernels by total time."""
    by_kind: dict[str, list[Interval]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, start, end in kernels:
        by_kind[kind_of(name)].append((start, end))
        totals[name] += end - start
        counts[name] += 1
    every = _union([iv for ivs in by_kind.values() for iv in ivs])
    compute = _union(by_kind["compute"])
    comm = _union(by_kind["comm"])
    busy = _length(every)
    span = (every[-1][1] - every[0][0]) if every else 0.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_ms": wall_ms, "gpu_busy_ms": busy, "gpu_idle_ms": max(0.0, wall_ms - busy),
        "gpu_span_ms": span, "kernels": len(kernels),
        "compute_ms": _length(compute), "comm_ms": _length(comm), "copy_ms": _length(_union(by_kind["copy"])),
        "comm_exposed_ms": _length(comm) - _length(_intersect(comm, compute)),
        "top_kernels": [{"name": n[:120], "ms": round(ms, 3), "count": counts[n]} for n, ms in ranked],
    }


def describe(summary: dict[str, Any]) -> str:
    """One line: wall, busy/idle, compute, communication (exposed) and copies, in ms."""
    s = summary
    return (f"wall {s['wall_ms']:.1f} ms: GPU busy {s['gpu_busy_ms']:.1f} (idle {s['gpu_idle_ms']:.1f}), compute "
            f"{s['compute_ms']:.1f}, NCCL {s['comm_ms']:.1f} (exposed {s['comm_exposed_ms']:.1f}), copies "
            f"{s['copy_ms']:.1f}, {s['kernels']} kernels")


def _union(intervals: list[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same time."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The time covered by both disjoint, sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)
