"""The digits captioning dataset: split, tokenizer, sample layout, accuracy, and a tiny LLaVA forward."""

from __future__ import annotations

import pytest
import torch

from mimo.data import WORDS, DigitsDataset, DigitsTokenizer, digits_split
from mimo.families.llava import IMAGES


def test_split_is_disjoint_and_covers_all_1797_scans() -> None:
    """297 held out, 1500 train, no overlap, the same on every call."""
    train, held = digits_split("train"), digits_split("held_out")
    assert (len(train), len(held)) == (1500, 297)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(1797))
    assert torch.equal(held, DigitsDataset(IMAGES, "held_out").indices)
    with pytest.raises(ValueError, match="unknown digits split 'test'"):
        digits_split("test")


def test_tokenizer_round_trips() -> None:
    """Every word encodes to an id below 256 and decodes back; unknown words are errors, unknown ids <unk>."""
    tok = DigitsTokenizer()
    text = "which digit ? " + " ".join(WORDS)
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size <= 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *tok.encode("seven"), tok.eos_id]) == "seven"
    assert tok.decode([200]) == "<unk>"
    with pytest.raises(ValueError, match=r"words \['eleven'\] are not in the digits vocabulary"):
        tok.encode("eleven")


def test_sample_layout() -> None:
    """[bos] <image ×16> which digit ? <answer> [eos]; labels only on the answer and eos; image [3, 8, 8]."""
    ds = DigitsDataset(IMAGES, "train")
    s, tok = ds[5], ds.tokenizer
    words = tok.encode(f"which digit ? {ds.answer_word(5)}")
    assert s.input_ids.tolist() == [tok.bos_id, *[256] * 16, *words, tok.eos_id]
    scored = (s.labels != -100).nonzero().squeeze(1).tolist()
    assert scored == [19, 20]
    assert s.labels[scored].tolist() == [words[-1], tok.eos_id]
    assert torch.equal(ds.prompt_for_generation(5), s.input_ids[:20])
    image = s.items["images"]
    assert image.shape == (1, 3, 8, 8) and image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[0, 0], image[0, 2])


def test_caption_accuracy() -> None:
    """Fraction of exact word matches; length mismatch is an error."""
    ds = DigitsDataset(IMAGES, "held_out")
    truth = [ds.answer_word(i) for i in range(4)]
    wrong = WORDS[(WORDS.index(truth[3]) + 1) % 10]
    assert ds.caption_accuracy([*truth[:3], wrong], range(4)) == 0.75
    with pytest.raises(ValueError, match="2 predictions for 4 indices"):
        ds.caption_accuracy(truth[:2], range(4))


def test_collated_digits_run_through_the_tiny_llava(tiny_llava) -> None:
    """A collated digits batch passes alignment and scores 2 labels per sample."""
    ds = DigitsDataset(IMAGES, "train", dtype=torch.float64)
    batch = ds.batch(range(8))
    with torch.no_grad():
        loss_sum, count = tiny_llava(batch.input_ids, batch.labels, batch.modality_inputs)
    assert torch.isfinite(loss_sum) and int(count) == 16 == batch.num_label_tokens(tiny_llava.special_token_ids)
