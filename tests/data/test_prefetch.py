"""BatchPrefetcher: the same batches as building them in the loop, one ahead, and a checkpoint position
that is always the next batch to train on."""

from __future__ import annotations

import threading
import time

import torch

from mimo.data import BatchPrefetcher, GlobalBatchSampler, ModalitySpec, SyntheticDataset


def _dataset() -> SyntheticDataset:
    return SyntheticDataset(20, {"images": ModalitySpec.image(300, 4)}, items_per_sample=(0, 1, 3), seed=2)


def _same(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            and torch.equal(a.modality_inputs["images"].items, b.modality_inputs["images"].items))


class _Recording:
    """A dataset that records, with the thread, every batch it is asked for."""

    def __init__(self, dataset: SyntheticDataset) -> None:
        self.dataset, self.calls = dataset, []

    def batch(self, indices):
        self.calls.append((list(indices), threading.current_thread().name))
        return self.dataset.batch(indices)


def test_batches_and_positions_equal_the_plain_loop():
    data = _dataset()
    plain, ahead = GlobalBatchSampler(20, 6, seed=1), GlobalBatchSampler(20, 6, seed=1)
    with BatchPrefetcher(data, ahead) as batches:
        for _ in range(7):  # across epochs (3 batches per epoch)
            assert _same(next(batches), data.batch(next(plain)))
            assert ahead.state_dict() == plain.state_dict()  # what a checkpoint saves


def test_the_next_batch_is_built_in_the_background_while_the_step_runs():
    recording, sampler = _Recording(_dataset()), GlobalBatchSampler(20, 6, seed=1)
    with BatchPrefetcher(recording, sampler) as batches:
        next(batches)
        deadline = time.monotonic() + 10  # a bound on waiting for the thread, not a speed claim
        while len(recording.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [indices for indices, _ in recording.calls] == [GlobalBatchSampler(20, 6, seed=1).batch_at(0, i)
                                                               for i in range(2)]
        assert all(name.startswith("mimo-batches") for _, name in recording.calls)


def test_a_sampler_moved_by_resume_gets_its_own_batch_not_the_prepared_one():
    data, sampler = _dataset(), GlobalBatchSampler(20, 6, seed=1)
    with BatchPrefetcher(data, sampler) as batches:
        next(batches)  # batch 1 is now being prepared
        saved = GlobalBatchSampler(20, 6, seed=1)
        saved.step = 2
        sampler.load_state_dict(saved.state_dict())
        assert _same(next(batches), data.batch(saved.batch_at(0, 2)))
