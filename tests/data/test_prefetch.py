"""BatchPrefetcher: the plain loop's batches in its order whatever the number of worker processes (real ones
here), built ahead in those processes; a checkpoint position that is always the next batch to train on, so a
resume (another worker count, across an epoch boundary) continues exactly; a worker's error raised as itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from mimo.data import (
    BadSample,
    BatchPrefetcher,
    GlobalBatchSampler,
    MimoBatch,
    ModalitySpec,
    SkippedSample,
    SyntheticDataset,
)
from mimo.data.prefetch import DataWorkerError, default_num_workers


def _dataset() -> SyntheticDataset:
    return SyntheticDataset(20, {"images": ModalitySpec.image(300, 4)}, items_per_sample=(0, 1, 3), seed=2)


def _sampler() -> GlobalBatchSampler:
    return GlobalBatchSampler(20, 6, seed=1)  # 3 batches per epoch


def _same(a: MimoBatch, b: MimoBatch) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            and torch.equal(a.modality_inputs["images"].items, b.modality_inputs["images"].items)
            and a.skipped == b.skipped)


class _Noisy:
    """Items plus noise from torch's global generator: what a random augmentation in `batch` does."""

    def __init__(self) -> None:
        self.dataset = _dataset()

    def batch(self, indices):
        batch = self.dataset.batch(indices)
        batch.modality_inputs["images"].items.add_(torch.rand(batch.modality_inputs["images"].items.shape))
        return batch


class _Recording:
    """Each batch built leaves a file named by the building process and the batch's first index."""

    def __init__(self, directory: Path) -> None:
        self.dataset, self.directory = _dataset(), directory

    def batch(self, indices):
        (self.directory / f"{os.getpid()}-{indices[0]}").touch()
        return self.dataset.batch(indices)


class _Skipping:
    """Every index divisible by 5 counts as a bad sample the batch builder replaced."""

    def __init__(self) -> None:
        self.dataset = _dataset()

    def batch(self, indices):
        batch = self.dataset.batch(indices)
        batch.skipped = tuple(SkippedSample(i, f"images/{i}.jpg", "missing image") for i in indices if i % 5 == 0)
        return batch


class _Failing:
    """Batch 0 holds a bad sample (raised as `on_bad_sample: error` does), or an error that cannot be pickled."""

    def __init__(self, picklable: bool = True) -> None:
        self.picklable = picklable

    def batch(self, indices):
        if not self.picklable:
            error = LookupError("the index file vanished")
            error.handle = lambda: None  # a lambda does not pickle
            raise error
        raise BadSample(indices[0], f"images/{indices[0]}.jpg", "cannot identify image file")


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_and_positions_equal_the_plain_loop(workers):
    data, plain, ahead = _Skipping(), _sampler(), _sampler()
    with BatchPrefetcher(data, ahead, num_workers=workers) as batches:
        for _ in range(7):  # across epochs
            assert _same(next(batches), data.batch(next(plain)))  # skipped records travel with the batch
            assert ahead.state_dict() == plain.state_dict()  # what a checkpoint saves


def test_batches_are_built_ahead_in_worker_processes(tmp_path):
    sampler = _sampler()
    with BatchPrefetcher(_Recording(tmp_path), sampler, num_workers=2, prefetch_factor=2) as batches:
        next(batches)
        deadline = time.monotonic() + 60  # a bound on waiting for the workers, not a speed claim
        while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        built = [p.name.split("-") for p in tmp_path.iterdir()]
    order = _sampler()
    ahead = [order.batch_at(*divmod(n, 3))[0] for n in range(5)]  # the one handed out, then 2 workers × 2
    assert len(built) >= 4 and {int(first) for _, first in built} <= set(ahead)
    assert {pid for pid, _ in built} and str(os.getpid()) not in {pid for pid, _ in built}


def test_randomness_in_a_batch_depends_on_its_position_not_on_the_workers():
    outputs = {}
    for workers in (0, 2):
        with BatchPrefetcher(_Noisy(), _sampler(), num_workers=workers) as batches:
            outputs[workers] = [next(batches) for _ in range(4)]
    assert all(_same(a, b) for a, b in zip(outputs[0], outputs[2], strict=True))
    before = torch.get_rng_state()
    with BatchPrefetcher(_Noisy(), _sampler()) as batches:
        next(batches)
    assert torch.equal(torch.get_rng_state(), before)  # in-process building leaves the training RNG alone


def test_a_resume_continues_with_exactly_the_next_batch_whatever_was_prefetched():
    data, plain = _dataset(), _sampler()
    first = _sampler()
    with BatchPrefetcher(data, first, num_workers=2) as batches:
        for _ in range(2):
            next(batches)
            next(plain)
        saved = first.state_dict()  # a checkpoint now; the workers have batches 2.. prepared
    assert (saved["epoch"], saved["step"]) == (0, 2)
    resumed = _sampler()
    resumed.load_state_dict(saved)
    with BatchPrefetcher(data, resumed, num_workers=1) as batches:
        for _ in range(3):  # epoch 0 step 2, then epoch 1 steps 0 and 1
            assert _same(next(batches), data.batch(next(plain)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sampler_moved_by_resume_gets_its_own_batch_not_the_prepared_one(workers):
    data, sampler = _dataset(), _sampler()
    with BatchPrefetcher(data, sampler, num_workers=workers) as batches:
        next(batches)  # batches 1.. are now being prepared
        saved = _sampler()
        saved.epoch, saved.step = 1, 2
        sampler.load_state_dict(saved.state_dict())
        assert _same(next(batches), data.batch(saved.batch_at(1, 2)))
        assert _same(next(batches), data.batch(saved.batch_at(2, 0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_in_a_worker_is_raised_as_itself(workers):
    first = _sampler().batch_at(0, 0)[0]
    with pytest.raises(BadSample) as raised, BatchPrefetcher(_Failing(), _sampler(), num_workers=workers) as batches:
        next(batches)
    assert str(raised.value) == f"sample {first} (images/{first}.jpg): cannot identify image file"
    assert raised.value.record == SkippedSample(first, f"images/{first}.jpg", "cannot identify image file")
    if workers:  # the worker's traceback is kept as a note, out of the message
        assert raised.value.__notes__[0].startswith("raised in a data loader worker building global batch 0 "
                                                    "(epoch 0, step 0):\nTraceback")


def test_an_error_that_cannot_travel_is_named_by_its_type_and_message():
    with pytest.raises(DataWorkerError) as raised, \
            BatchPrefetcher(_Failing(picklable=False), _sampler(), num_workers=1) as batches:
        next(batches)
    assert str(raised.value) == "LookupError: the index file vanished"


def test_the_default_worker_count_leaves_a_cpu_to_each_rank(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    assert [default_num_workers(n) for n in (1, 2, 8, 16)] == [8, 7, 1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA (the GPU machine runs this)")
def test_workers_batches_come_back_pinned_on_a_gpu():
    data, plain = _Skipping(), _sampler()
    with BatchPrefetcher(data, _sampler(), pin_memory=True, num_workers=2) as batches:
        for _ in range(4):
            batch = next(batches)
            assert batch.input_ids.is_pinned() and batch.modality_inputs["images"].items.is_pinned()
            assert _same(batch, data.batch(next(plain)))
