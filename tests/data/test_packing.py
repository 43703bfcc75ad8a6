"""Sequence packing's arrangement: what each sample keeps, positions, documents, the tail, labels per sample."""

from __future__ import annotations

import pytest
import torch

from mimo.data import MimoBatch, Sample, next_token_labels
from mimo.data.packing import PackedText, PaddedText, real_tokens, sample_extents
from mimo.models.labels import IGNORE_INDEX, is_special

IMAGE = 300  # a special token id outside the text ids
SPECIAL = {"images": IMAGE}


def _sample(ids: list[int], ignore_last: int = 0) -> Sample:
    t = torch.tensor(ids)
    labels = next_token_labels(t)
    if ignore_last:
        labels[-ignore_last:] = IGNORE_INDEX
    return Sample(t, labels)


def _batch() -> MimoBatch:
    """Three samples of lengths 3, 6 and 4: plain text; an image block then text whose last three labels are
    not scored; text with no scored label at all."""
    return MimoBatch.collate([
        _sample([1, 10, 11]),
        _sample([1, IMAGE, IMAGE, 12, 13, 14], ignore_last=3),
        _sample([1, 15, 16, 17], ignore_last=4),
    ], pad_id=0)


def test_a_sample_keeps_up_to_its_last_scored_label_or_modality_token():
    b = _batch()
    # sample 0: labels at 0,1 (last is ignored) -> 2; sample 1: last scored label at 2 -> 3;
    # sample 2: nothing scored, no image -> 0
    assert sample_extents(b.input_ids, b.labels, SPECIAL).tolist() == [2, 3, 0]


def test_packed_row_lays_samples_end_to_end_with_restarting_positions():
    text = PackedText().arrange(_batch(), SPECIAL)
    assert text.input_ids.tolist() == [[1, 10, 1, IMAGE, IMAGE]]
    assert text.position_ids.tolist() == [[0, 1, 0, 1, 2]]
    assert text.document_ids.tolist() == [[0, 0, 1, 1, 1]]
    # each sample's labels are its own next tokens: the last kept label never names the next sample's first token
    assert text.labels.tolist() == [[10, 11, IMAGE, IMAGE, 12]]
    assert text.longest == 3
    assert text.model_kwargs().keys() == {"position_ids", "document_ids", "document_bounds", "scored_positions"}
    assert text.document_bounds.tolist() == [0, 2, 5]
    assert text.scored_positions.tolist() == [0, 1, 2, 3, 4]  # every position with a target (modality ones too)


def test_the_row_is_rounded_up_with_an_unlabelled_document_of_its_own():
    text = PackedText(multiple=4).arrange(_batch(), SPECIAL)
    assert text.input_ids.shape == (1, 8)
    assert text.labels[0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert text.document_ids[0, 5:].tolist() == [3, 3, 3]
    assert text.position_ids[0, 5:].tolist() == [0, 0, 0]


def test_a_share_with_nothing_to_keep_packs_to_one_unlabelled_position():
    b = _batch().select(2, 3)
    text = PackedText(multiple=1).arrange(b, SPECIAL)
    assert text.input_ids.shape == (1, 1) and text.labels.tolist() == [[IGNORE_INDEX]]


def test_packing_keeps_the_scored_labels_and_modality_tokens():
    b = _batch()
    text = PackedText(multiple=8).arrange(b, SPECIAL)
    assert MimoBatch(text.input_ids, text.labels).num_label_tokens(SPECIAL) == b.num_label_tokens(SPECIAL)
    assert int((text.input_ids == IMAGE).sum()) == int((b.input_ids == IMAGE).sum())


def test_padded_layout_is_the_batch_itself():
    b = _batch()
    text = PaddedText().arrange(b, SPECIAL)
    assert text.input_ids is b.input_ids and text.labels is b.labels
    assert text.model_kwargs().keys() == {"scored_positions"}
    assert text.scored_positions.tolist() == (b.labels.flatten() != IGNORE_INDEX).nonzero().flatten().tolist()
    assert text.longest == b.input_ids.shape[1]


def test_a_non_positive_multiple_is_refused():
    with pytest.raises(ValueError, match="packing multiple must be positive, got 0"):
        PackedText(multiple=0)
    with pytest.raises(ValueError, match="padding multiple must be positive, got 0"):
        PaddedText(multiple=0)


def test_padded_rows_widen_to_a_multiple_with_unlabelled_columns():
    b = _batch()
    text = PaddedText(multiple=64).arrange(b, SPECIAL)
    width = b.input_ids.shape[1]
    assert text.input_ids.shape == (b.num_samples, 64 * -(-width // 64)) and text.labels.shape == text.input_ids.shape
    assert torch.equal(text.input_ids[:, :width], b.input_ids) and torch.equal(text.labels[:, :width], b.labels)
    assert (text.labels[:, width:] == IGNORE_INDEX).all() and not is_special(text.input_ids[:, width:], SPECIAL).any()


@pytest.mark.parametrize("layout", [PaddedText(), PaddedText(multiple=64), PackedText(), PackedText(multiple=4)],
                         ids=["padded", "padded-64", "1", "4"])
@pytest.mark.parametrize("samples", [(0, 3), (2, 3)], ids=["three", "nothing-to-keep"])
def test_a_layout_counts_the_positions_it_arranges(layout, samples):
    """What the step logs as `positions` is the size of the rows the language model is given."""
    b = _batch().select(*samples)
    extents = sample_extents(b.input_ids, b.labels, SPECIAL)
    assert layout.positions(extents, b.input_ids.shape[1]) == layout.arrange(b, SPECIAL).input_ids.numel()
    assert real_tokens(b, SPECIAL) == int(extents.sum()) == (5 if samples == (0, 3) else 0)


@pytest.mark.parametrize("multiple", [1, 4])
def test_packed_layout_hands_on_each_kept_sample_as_a_document(multiple):
    """What the step reports for the FLOP count: the documents the packed row's attention is confined to, one
    per sample with something to keep (in arrange's order), and none for padded rows."""
    b = _batch()
    extents = sample_extents(b.input_ids, b.labels, SPECIAL)
    text = PackedText(multiple).arrange(b, SPECIAL)
    kept = [int((text.document_ids == d).sum()) for d in range(b.num_samples)]
    assert PackedText(multiple).documents(extents) == tuple(n for n in kept if n) == (2, 3)
    assert PaddedText().documents(extents) is None


@pytest.mark.parametrize(("packing", "compile_", "tp", "fp8", "device", "want"), [
    (True, False, 1, False, "cuda", PackedText(128)), (True, False, 1, False, "cpu", PackedText(1)),
    (False, True, 2, False, "cuda", PaddedText(64)),  # compiled TP blocks take static shapes: few widths to compile
    (False, True, 2, False, "cpu", PaddedText(1)), (False, True, 1, False, "cuda", PaddedText(1)),
    (False, False, 2, False, "cuda", PaddedText(1)),
    # a float8 weight gradient's matmul sums over the micro-batch's tokens, and float8 matmuls need that count a
    # multiple of 16: a GPU's padded rows are as wide as that (the CPU's emulated matmuls need nothing)
    (False, True, 1, True, "cuda", PaddedText(16)), (False, True, 2, True, "cuda", PaddedText(64)),
    (False, True, 1, True, "cpu", PaddedText(1)),
])
def test_the_run_picks_its_text_layout(packing, compile_, tp, fp8, device, want):
    from mimo.training.loop import text_layout
    from mimo.training.run_config import parse_run_config

    config = parse_run_config({"parallelism": {"images": {}, "language": {"tensor_model_parallel_size": tp}},
                               "train": {"compile": compile_, "dtype": "bfloat16"},
                               "distributed": {"language": {"fp8": "tensorwise" if fp8 else "none"}},
                               "data": {"name": "synthetic", "packing": packing}})
    assert text_layout(config, torch.device(device)) == want
