"""GlobalBatchSampler: deterministic from the seed, reshuffled per epoch, resumable mid-epoch, size checks."""

from __future__ import annotations

import itertools

import pytest

from mimo.data import GlobalBatchSampler


def _take(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    """The next n batches."""
    return list(itertools.islice(sampler, n))


def test_same_seed_same_batches_and_each_epoch_covers_the_data() -> None:
    """Two samplers with one seed agree; an epoch is a permutation (minus the dropped tail)."""
    a, b = GlobalBatchSampler(50, 8, seed=3), GlobalBatchSampler(50, 8, seed=3)
    assert a.steps_per_epoch == 6
    batches = _take(a, 12)
    assert batches == _take(b, 12)
    assert all(len(x) == 8 for x in batches)
    first_epoch = sum(batches[:6], [])
    assert len(set(first_epoch)) == 48 and set(first_epoch) <= set(range(50))
    assert batches != _take(GlobalBatchSampler(50, 8, seed=4), 12)


def test_epochs_differ_and_use_seed_plus_epoch() -> None:
    """Epoch 1's order differs from epoch 0's and equals epoch 0's order of a sampler seeded seed+1."""
    s = GlobalBatchSampler(40, 10, seed=7)
    epoch0, epoch1 = _take(s, 4), _take(s, 4)
    assert epoch0 != epoch1
    assert epoch1 == _take(GlobalBatchSampler(40, 10, seed=8), 4)


def test_resume_mid_epoch_continues_identically() -> None:
    """State saved after 9 batches (mid epoch 1) resumes a fresh sampler onto the same next batches."""
    reference = GlobalBatchSampler(30, 4, seed=0)
    expected = _take(reference, 20)
    run = GlobalBatchSampler(30, 4, seed=0)
    _take(run, 9)
    state = run.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = GlobalBatchSampler(30, 4, seed=0)
    resumed.load_state_dict(state)
    assert _take(resumed, 11) == expected[9:]


def test_resume_with_other_settings_is_an_error() -> None:
    """Loading a state saved with another seed would change the batches: refused, naming the setting."""
    state = GlobalBatchSampler(30, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        GlobalBatchSampler(30, 4, seed=1).load_state_dict(state)


def test_no_shuffle_and_keep_last() -> None:
    """shuffle=False is 0..n-1 in order; drop_last=False completes the tail from the epoch's start."""
    s = GlobalBatchSampler(10, 4, seed=0, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert _take(s, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [0, 1, 2, 3]]


def test_dataset_smaller_than_a_global_batch() -> None:
    """A dataset that cannot fill one global batch is an error naming both sizes."""
    with pytest.raises(ValueError, match="the dataset has 5 samples, fewer than one global batch of 8"):
        GlobalBatchSampler(5, 8, seed=0)
    with pytest.raises(ValueError, match="global_batch_size must be positive"):
        GlobalBatchSampler(5, 0, seed=0)
