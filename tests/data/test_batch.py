"""MimoBatch: shard / microbatch / concat round trips, item slicing at empty samples, collate, errors."""

from __future__ import annotations

import pytest
import torch

from mimo.data import MimoBatch, ModalitySpec, Sample, SyntheticDataset
from mimo.models import ModalityBatch

IMAGES = [0, 1, 3, 0, 3, 1]  # 0, 1 and 3 items, empty samples at a shard boundary (index 3)
AUDIO = [2, 0, 0, 0, 1, 0]


def _items(counts: list[int], shape: tuple[int, ...]) -> ModalityBatch:
    """Items whose every value is their row number, so a slice shows exactly which rows it kept."""
    n = sum(counts)
    rows = torch.arange(n, dtype=torch.float64).view(n, *([1] * len(shape))).expand(n, *shape).clone()
    return ModalityBatch(rows, torch.tensor(counts))


def _batch() -> MimoBatch:
    """6 samples of length 5 with images (3×8×8) and audio (16×16) items."""
    ids = torch.arange(30).view(6, 5)
    return MimoBatch(ids, ids + 100, {"images": _items(IMAGES, (3, 8, 8)), "audio": _items(AUDIO, (16, 16))})


def _assert_equal(a: MimoBatch, b: MimoBatch) -> None:
    """Same text, labels, modalities, items and counts."""
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert list(a.modality_inputs) == list(b.modality_inputs)
    for name in a.modality_inputs:
        assert torch.equal(a.modality_inputs[name].items, b.modality_inputs[name].items)
        assert torch.equal(a.modality_inputs[name].items_per_sample, b.modality_inputs[name].items_per_sample)


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
def test_shards_and_microbatches_concatenate_back_to_the_batch(parts: int) -> None:
    """Joining all DP shards (or all micro-batches) in order gives back the batch exactly."""
    batch = _batch()
    _assert_equal(MimoBatch.concat([batch.shard(d, parts) for d in range(parts)]), batch)
    _assert_equal(MimoBatch.concat([batch.microbatch(m, parts) for m in range(parts)]), batch)


def test_shard_slices_items_by_cumulative_counts() -> None:
    """Replica d of 3 gets samples [2d, 2d+2) and exactly their item rows, including empty samples."""
    batch = _batch()
    expected_rows = {"images": [[0], [1, 2, 3], [4, 5, 6, 7]], "audio": [[0, 1], [], [2]]}
    expected_counts = {"images": [[0, 1], [3, 0], [3, 1]], "audio": [[2, 0], [0, 0], [1, 0]]}
    for d in range(3):
        shard = batch.shard(d, 3)
        assert torch.equal(shard.input_ids, batch.input_ids[2 * d : 2 * d + 2])
        for name, rows in expected_rows.items():
            got = shard.modality_inputs[name]
            assert got.items.flatten(1)[:, 0].tolist() == rows[d]
            assert got.items_per_sample.tolist() == expected_counts[name][d]


def test_a_shard_with_no_items_keeps_the_modality_with_an_empty_stack() -> None:
    """Sample 3 has no image: its shard still has an "images" entry of shape [0, 3, 8, 8]."""
    shard = _batch().shard(3, 6)
    assert shard.modality_inputs["images"].items.shape == (0, 3, 8, 8)
    assert shard.modality_inputs["images"].items_per_sample.tolist() == [0]


@pytest.mark.parametrize("method, name", [("shard", "dp_size"), ("microbatch", "num_microbatches")])
def test_uneven_split_names_both_numbers(method: str, name: str) -> None:
    """6 samples into 4 parts is an error that names 6 and 4."""
    with pytest.raises(ValueError, match=rf"6 samples does not split into {name}=4 equal parts"):
        getattr(_batch(), method)(0, 4)


def test_bad_part_index_and_count() -> None:
    """An index outside [0, parts) and a non-positive part count are errors."""
    with pytest.raises(IndexError, match=r"DP rank 3 is outside \[0, 3\)"):
        _batch().shard(3, 3)
    with pytest.raises(ValueError, match="num_microbatches must be positive, got 0"):
        _batch().microbatch(0, 0)


def test_mismatched_counts_are_rejected() -> None:
    """A modality with counts for another number of samples than the text is an error."""
    with pytest.raises(ValueError, match="items_per_sample for 2 samples, but the batch has 6"):
        MimoBatch(torch.zeros(6, 3, dtype=torch.long), torch.zeros(6, 3, dtype=torch.long),
                  {"images": _items([1, 1], (3, 8, 8))})


def test_collate_pads_text_and_stacks_items() -> None:
    """Text right-padded (labels with -100), items stacked in sample order, a missing modality = 0 items."""
    a = Sample(torch.tensor([1, 2, 3]), torch.tensor([2, 3, -100]), {"images": torch.ones(2, 3, 8, 8)})
    b = Sample(torch.tensor([4]), torch.tensor([-100]), {})
    c = Sample(torch.tensor([5, 6]), torch.tensor([6, -100]), {"images": torch.zeros(1, 3, 8, 8)})
    batch = MimoBatch.collate([a, b, c], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch.labels.tolist() == [[2, 3, -100], [-100, -100, -100], [6, -100, -100]]
    images = batch.modality_inputs["images"]
    assert images.items_per_sample.tolist() == [2, 0, 1]
    assert images.items[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]
    assert MimoBatch.collate([a, b], pad_id=0, seq_len=8).input_ids.shape == (2, 8)
    with pytest.raises(ValueError, match="a sample has 3 tokens, more than seq_len=2"):
        MimoBatch.collate([a], pad_id=0, seq_len=2)


def test_prefetch_keeps_what_a_module_needs_and_counts_on_the_cpu() -> None:
    """An encoder's share: its items only; the language's: text only. On the CPU nothing is copied; the
    pinned, non-blocking copy itself runs in the CUDA smoke test (it needs a GPU)."""
    batch = _batch()
    encoder = batch.prefetch("cpu", modalities=("images",), text=False)
    assert list(encoder.modality_inputs) == ["images"]
    assert encoder.modality_inputs["images"].items is batch.modality_inputs["images"].items
    language = batch.prefetch("cpu")
    assert language.modality_inputs == {} and language.input_ids is batch.input_ids
    assert encoder.select(2, 5).modality_inputs["images"].items_per_sample.tolist() == [3, 0, 3]


def test_num_label_tokens_is_the_models_loss_count(tiny_llava) -> None:
    """The loss normalizer counts exactly the labels `MimoModel.forward` scores, on a synthetic batch."""
    ds = SyntheticDataset(16, {"images": ModalitySpec.image(256, 16)}, dtype=torch.float64, seed=3)
    batch = ds.batch(range(16))
    with torch.no_grad():
        _, count = tiny_llava(batch.input_ids, batch.labels, batch.modality_inputs)
    assert batch.num_label_tokens(tiny_llava.special_token_ids) == int(count)
    # the rule really excludes something: positions whose input or label is an image token
    assert int(count) < int((batch.labels != -100).sum())
    # and it adds up over DP shards and micro-batches, as the global normalizer needs
    parts = [batch.shard(d, 4).microbatch(m, 2) for d in range(4) for m in range(2)]
    assert sum(p.num_label_tokens([256]) for p in parts) == int(count)


def _packed(counts: list[int]) -> ModalityBatch:
    """Packed items of different sizes (item i: grid [1, 1, i + 1], so i + 1 rows), each row holding its item's
    index, so a slice shows exactly which items' rows it kept."""
    n = sum(counts)
    grids = torch.tensor([[1, 1, i + 1] for i in range(n)])
    rows = torch.cat([torch.full((i + 1, 2), float(i)) for i in range(n)])
    return ModalityBatch(rows, torch.tensor(counts), grids)


def test_packed_items_slice_by_their_rows_and_join_back() -> None:
    """Items of different sizes: a shard holds exactly its items' rows and grids; shards join back to the batch."""
    ids = torch.arange(30).view(6, 5)
    batch = MimoBatch(ids, ids, {"images": _packed(IMAGES)})
    shard = batch.shard(1, 3)  # samples 2, 3: items 1..3 (3 items, 2 + 3 + 4 rows), then none
    got = shard.modality_inputs["images"]
    assert got.items[:, 0].tolist() == [1.0] * 2 + [2.0] * 3 + [3.0] * 4
    assert got.item_grids[:, 2].tolist() == [2, 3, 4] and got.items_per_sample.tolist() == [3, 0]
    joined = MimoBatch.concat([batch.shard(d, 3) for d in range(3)]).modality_inputs["images"]
    assert torch.equal(joined.items, batch.modality_inputs["images"].items)
    assert torch.equal(joined.item_grids, batch.modality_inputs["images"].item_grids)


def test_packed_items_that_disagree_with_their_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="packed items hold 5 rows but item_grids announce 6"):
        ModalityBatch(torch.zeros(5, 2), torch.tensor([2]), torch.tensor([[1, 1, 2], [1, 2, 2]]))


def test_collate_packs_items_of_different_sizes() -> None:
    """Samples with images of different sizes collate to one packed stack with the grids in sample order."""
    a = Sample(torch.arange(3), torch.arange(3), {"images": torch.ones(4, 2)}, {"images": torch.tensor([[1, 2, 2]])})
    b = Sample(torch.arange(2), torch.arange(2))
    c = Sample(torch.arange(2), torch.arange(2), {"images": torch.zeros(6, 2)}, {"images": torch.tensor([[1, 2, 3]])})
    got = MimoBatch.collate([a, b, c], pad_id=0).modality_inputs["images"]
    assert got.items.shape == (10, 2) and got.items_per_sample.tolist() == [1, 0, 1]
    assert got.item_grids.tolist() == [[1, 2, 2], [1, 2, 3]]
