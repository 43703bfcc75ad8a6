"""The next global batch, built (and pinned for a GPU) in a background thread while the current step runs.

What a DataLoader's worker and pin-memory thread do, for mimo's map-style datasets and its global-batch
sampler. The sampler moves on only when a batch is handed out, so a checkpoint's data position is always
the next batch to train on, never the one being prepared; a batch prepared for another position (after
`load_state_dict`) is dropped and the right one built.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mimo.data.batch import MimoBatch
from mimo.data.sampler import GlobalBatchSampler


class BatchPrefetcher:
    """An iterator of `dataset.batch(indices)` over `sampler`, one batch ahead; a context manager."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, pin_memory: bool = False) -> None:
        """`dataset` has `batch(indices) -> MimoBatch` (thread-safe: mimo's datasets are); `pin_memory` for a GPU."""
        self.dataset, self.sampler, self.pin_memory = dataset, sampler, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mimo-batches")
        self._pending: tuple[list[int], Future[MimoBatch]] | None = None

    def __iter__(self) -> BatchPrefetcher:
        return self

    def __next__(self) -> MimoBatch:
        """The batch at the sampler's position (prepared during the last step if it was the right one); the
        sampler moves on and the following batch starts building."""
        indices = self.sampler.peek()
        pending = self._pending
        future = pending[1] if pending is not None and pending[0] == indices else self._submit(indices)
        next(self.sampler)
        upcoming = self.sampler.peek()
        self._pending = (upcoming, self._submit(upcoming))
        return future.result()

    def close(self) -> None:
        """Stop the background thread (a batch being built is finished first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, indices: list[int]) -> Future[MimoBatch]:
        return self._pool.submit(self._build, indices)

    def _build(self, indices: list[int]) -> MimoBatch:
        batch = self.dataset.batch(indices)
        return batch.pin_memory() if self.pin_memory else batch
