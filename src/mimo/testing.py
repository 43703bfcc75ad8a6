"""Multi-process and fake-world harnesses for tests and benchmarks.

`run_distributed` runs a function on N real gloo processes and collects what each rank returns: a
parent-owned TCPStore (no free-port race), workers started from a forkserver that has already imported
torch (fast start), every rank's traceback on failure, and a timeout that names the ranks that never finished.
`assert_matches_reference` is the one way parity tests compare tensors with the single-process numbers.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_HOST = "127.0.0.1"
_GRACE_S = 10.0  # after one rank fails, how long the others get to report before they are killed


class DistributedTestError(AssertionError):
    """One or more ranks raised, died or did not finish in time."""


def _context() -> mp.context.BaseContext:
    """A forkserver context that preloads torch and mimo's training modules (what a test's function imports), so
    each worker starts in well under a second instead of importing them again (seconds per rank)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mimo.training.loop", "mimo.testing"])
    return ctx


def _loopback_interface() -> str | None:
    """The name of the loopback interface, so gloo stays on this machine whatever the hostname says."""
    for _, name in socket.if_nameindex():
        if name in ("lo", "lo0"):
            return name
    return None


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    pg_timeout_s: float,
    results: mp.Queue,
    backend: str,
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of one rank: join the world (gloo, or NCCL on GPU `rank`), run `fn`, report its result or traceback."""
    torch.set_num_threads(1)
    iface = _loopback_interface()
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    try:
        store = dist.TCPStore(_HOST, port, world_size + 1, is_master=False,
                              timeout=timedelta(seconds=pg_timeout_s))
        device = None
        if backend == "nccl":  # one GPU per rank, bound at init as mimo's own launcher does
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s), device_id=device)
        out = fn(rank, world_size, *args, **kwargs)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            from mimo.training.loop import leave_world

            leave_world()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 180.0,
    pg_timeout_s: float = 60.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Call `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo processes (or NCCL ones, one GPU per
    rank, with `backend="nccl"`); return results by rank.

    `fn` must be importable (a module-level function); its return value must pickle. Raises
    `DistributedTestError` with every failing rank's traceback, the ranks that died without a word,
    and the ranks still running when `timeout_s` ran out.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"run_distributed runs 1 to 8 processes on one machine, got world_size={world_size}")
    ctx = _context()
    store = dist.TCPStore(_HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout_s))
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, name=f"mimo-rank{r}",
                    args=(fn, r, world_size, store.port, pg_timeout_s, results, backend, args, kwargs))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outcome = _collect(procs, results, time.monotonic() + timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        del store
    return _outcome_or_raise(fn, world_size, backend, outcome, timeout_s)


def _collect(procs: list[mp.Process], results: mp.Queue, deadline: float) -> dict[int, tuple[str, Any]]:
    """Gather (status, payload) per rank until all report, the deadline passes, or a failure's grace ends."""
    outcome: dict[int, tuple[str, Any]] = {}
    first_error_at: float | None = None
    while len(outcome) < len(procs):
        now = time.monotonic()
        if now > deadline or (first_error_at is not None and now > first_error_at + _GRACE_S):
            break
        try:
            rank, status, payload = results.get(timeout=0.2)
        except queue.Empty:
            for r, p in enumerate(procs):
                if r not in outcome and p.exitcode is not None and not _drain_pending(results, outcome):
                    outcome[r] = ("died", f"process exited with code {p.exitcode} before reporting")
                    first_error_at = first_error_at or now
            continue
        outcome[rank] = (status, payload)
        if status != "ok" and first_error_at is None:
            first_error_at = time.monotonic()
    return outcome


def _drain_pending(results: mp.Queue, outcome: dict[int, tuple[str, Any]]) -> bool:
    """Read a report that raced with its process's exit; True if one was read."""
    try:
        rank, status, payload = results.get(timeout=0.5)
    except queue.Empty:
        return False
    outcome[rank] = (status, payload)
    return True


def _outcome_or_raise(fn: Callable, world_size: int, backend: str, outcome: dict, timeout_s: float) -> list[Any]:
    """The per-rank results, or one error that shows every rank's failure and every silent rank."""
    failed = {r: o for r, o in sorted(outcome.items()) if o[0] != "ok"}
    missing = [r for r in range(world_size) if r not in outcome]
    if not failed and not missing:
        return [pickle.loads(outcome[r][1]) for r in range(world_size)]
    name = getattr(fn, "__qualname__", repr(fn))
    lines = [f"{name} on {world_size} {backend} processes failed:"]
    for r, (status, payload) in failed.items():
        lines.append(f"--- rank {r} ({status}) ---\n{payload}")
    if missing:
        why = "after another rank failed" if failed else f"within {timeout_s:.0f} s"
        lines.append(f"--- ranks {missing} did not finish {why} (killed) ---")
    raise DistributedTestError("\n".join(lines))


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """Be rank `rank` of a world of any size in this one process, on PyTorch's fake backend.

    The fake backend accepts every collective without moving data: enough to check group arithmetic
    and creation at thousands of ranks.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore  # also registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Attention key biases have an exactly zero gradient (softmax ignores a shift shared by all keys), so their
# gradients, and what the optimizer makes of them, are rounding noise with no scale of their own: after 5 AdamW
# steps the audio encoder's k_proj.bias of parity row 9 is 8.8e-15 in one process and differs by 1.3e-14 on a
# layout (2026-12-06, this machine's CPU; 1e-6 here was then too tight: 1e-6 × 1e-8 = 1e-14 is the noise itself).
# A tensor is compared relative to its own largest value, but never to less than this floor: 1e-4, or 1e-4 of
# the reference set's largest value where that exceeds 1. Far below anything that trains (init std 0.02, an
# AdamW step of lr 1e-3 to 1e-2 moves even a zero-initialized bias past it), far above the noise (1e-4 × 1e-8 =
# 1e-12, a hundred times the noise above).
SCALE_FLOOR = 1e-4


def relative_difference(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - want| over max(max |want|, floor)."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).abs().max() / want.abs().max().clamp_min(max(floor, 1e-300)))


def assert_matches_reference(got: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str,
                             rel: float = 1e-8) -> float:
    """Every tensor of `got` within `rel` of `reference[name]` (see SCALE_FLOOR for the scale); the largest
    relative difference. Names must exist in `reference`; `got` may hold only some of them (a rank's part)."""
    floor = SCALE_FLOOR * max((float(t.abs().max()) for t in reference.values() if t.numel()), default=1.0)
    floor = max(floor, SCALE_FLOOR)
    worst = 0.0
    for name, tensor in got.items():
        diff = relative_difference(tensor, reference[name], floor)
        assert diff <= rel, f"{what}: {name} differs from the reference by {diff:.1e} (relative) > {rel:.0e}"
        worst = max(worst, diff)
    return worst
