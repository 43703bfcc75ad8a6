"""The training loader: global batches built by `torch.utils.data.DataLoader` workers while the step runs.

One DataLoader item is one whole global batch (DESIGN §3: every rank holds the same one): item n is the
sampler's n-th batch (epoch n // steps_per_epoch, that step), `dataset.batch(indices)` built under a seed of
(sampler seed, n). So a batch, its order and any randomness inside it are a pure function of (seed, epoch,
step), whatever `num_workers` (0 builds in this process) and whichever worker built it; workers return
batches in order, pinned for a GPU by the DataLoader's pin-memory thread.

The sampler moves on only when a batch is handed out, so a checkpoint's data position is always the next
batch to train on, never one a worker has prepared; after `sampler.load_state_dict` the prepared batches are
dropped and loading restarts at the sampler's position (the workers persist).

An exception raised while a worker builds a batch (a dataset's `BadSample`, say) is raised here as itself:
same type, same one-line message, the worker's traceback attached as a note, instead of DataLoader's
re-raise, which wraps the whole pickled traceback into the message (or into a RuntimeError when the type
cannot be rebuilt from one string).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mimo.data.batch import MimoBatch
from mimo.data.sampler import GlobalBatchSampler

MAX_DEFAULT_WORKERS = 8  # past this, more processes add memory (prefetch_factor batches each), not throughput
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # spreads (seed, position) over the generators' seed space


def default_num_workers(local_ranks: int = 1) -> int:
    """`data.num_workers` when the config leaves it out: min(8, CPUs per rank - 1). One CPU stays with the
    training process (the step's host work, the pin-memory thread); 0 (in-process) on a machine too small."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, local_ranks) - 1))


class DataWorkerError(RuntimeError):
    """A loader worker raised an exception that cannot travel between processes; its type and message."""


class BatchPrefetcher:
    """An iterator of `dataset.batch(indices)` over `sampler`, built ahead by `num_workers` processes
    (0: in this process, on demand); a context manager that stops the workers."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, pin_memory: bool = False, num_workers: int = 0,
                 prefetch_factor: int = 2, worker_init: Callable[[int], None] | None = None) -> None:
        """`dataset` has `batch(indices) -> MimoBatch`; `pin_memory` for a GPU; each worker keeps up to
        `prefetch_factor` global batches ready (so num_workers × prefetch_factor batches in host memory), and runs
        `worker_init(worker_id)` when it starts (after torch's own signal handlers)."""
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {num_workers} and "
                             f"{prefetch_factor}")
        self.sampler = sampler
        self._positions = _Positions()
        workers = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers else {}
        # its own generator: the workers' base seed, never the caller's RNG
        self._loader = DataLoader(_GlobalBatches(dataset, sampler, catch=num_workers > 0), batch_size=None,
                                  sampler=self._positions, num_workers=num_workers, collate_fn=_as_is,
                                  pin_memory=pin_memory, generator=torch.Generator().manual_seed(sampler.seed),
                                  worker_init_fn=worker_init, **workers)
        self._iterator: Iterator[tuple[int, Any]] | None = None
        self._next = -1  # the position the iterator hands out next

    def __iter__(self) -> BatchPrefetcher:
        return self

    def __next__(self) -> MimoBatch:
        """The batch at the sampler's position; the sampler moves on (loading restarts there if it was moved)."""
        position = _flat_position(self.sampler)
        if self._iterator is None or position != self._next:
            self._positions.start = position
            self._iterator = iter(self._loader)  # persistent workers: the prepared batches are dropped
        got, batch = next(self._iterator)
        if got != position:
            raise RuntimeError(f"the loader handed out global batch {got}, expected {position}")
        if isinstance(batch, _Failure):
            batch.reraise()
        next(self.sampler)
        self._next = position + 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (a no-op without workers)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat_position(sampler: GlobalBatchSampler) -> int:
    """The sampler's position as one number: batches handed out since epoch 0, step 0."""
    return sampler.epoch * sampler.steps_per_epoch + sampler.step


def _as_is(item: Any) -> Any:
    """The DataLoader's collate function: an item is already a whole batch."""
    return item


class _Positions(Sampler[int]):
    """Global batch numbers start, start+1, ... without end (the training loop decides when to stop)."""

    def __init__(self) -> None:
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield position
            position += 1


class _GlobalBatches(Dataset):
    """Item n: (n, the sampler's n-th global batch), built under the seed of (sampler seed, n); with `catch`
    (in a worker process) an exception is returned as a `_Failure` to be raised in the training process."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, catch: bool) -> None:
        self.dataset, self.catch = dataset, catch
        settings = sampler.state_dict()
        del settings["epoch"], settings["step"]
        self.order = GlobalBatchSampler(**settings)  # its own copy: only `batch_at`, a pure function, is used

    def __getitem__(self, position: int) -> tuple[int, Any]:
        epoch, step = divmod(position, self.order.steps_per_epoch)
        try:
            with _seeded((self.order.seed * _SEED_MULTIPLIER + position) % 2**63):
                return position, self.dataset.batch(self.order.batch_at(epoch, step))
        except Exception as e:
            if not self.catch:
                raise
            return position, _Failure.of(e, f"global batch {position} (epoch {epoch}, step {step})")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's, Python's (and numpy's, if loaded) global generators seeded, and restored afterwards, so a
    dataset's randomness depends on the batch, not on the process or what ran before."""
    saved_random = random.getstate()
    numpy = sys.modules.get("numpy")
    saved_numpy = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        if numpy is not None:
            numpy.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(saved_random)
            if numpy is not None:
                numpy.random.set_state(saved_numpy)


@dataclass
class _Failure:
    """An exception from a worker, as its class, args and attributes (rebuilt without calling `__init__`,
    whose signature may not be the args'), or only its type name and message if those cannot be pickled."""

    type_name: str
    message: str
    where: str
    parts: bytes | None

    @classmethod
    def of(cls, error: Exception, what: str) -> _Failure:
        lines = "".join(traceback.format_exception(error)).rstrip()
        try:
            parts = pickle.dumps((type(error), error.args, vars(error)))
        except Exception:
            parts = None
        return cls(type(error).__name__, str(error), f"raised in a data loader worker building {what}:\n{lines}",
                   parts)

    def reraise(self) -> None:
        """Raise the worker's exception here: the same type and message, the worker's traceback as a note."""
        error: Exception = DataWorkerError(f"{self.type_name}: {self.message}")
        if self.parts is not None:
            with contextlib.suppress(Exception):
                kind, args, attributes = pickle.loads(self.parts)
                rebuilt = kind.__new__(kind, *args)
                rebuilt.args = args
                rebuilt.__dict__.update(attributes)
                error = rebuilt
        error.add_note(self.where)
        raise error
