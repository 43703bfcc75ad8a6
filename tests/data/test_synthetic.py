"""SyntheticDataset: deterministic per index, varying items, token counts that the model's alignment accepts."""

from __future__ import annotations

import pytest
import torch

from mimo.data import ModalitySpec, SyntheticDataset

IMAGES = ModalitySpec.image(256, 16)
AUDIO = ModalitySpec.audio(257, 8, n_mels=16, frames=16)


def _two_modalities(seed: int = 0, n: int = 64) -> SyntheticDataset:
    """Images and audio, 0, 1 or 3 items of each per sample."""
    return SyntheticDataset(n, {"images": IMAGES, "audio": AUDIO}, seed=seed)


def test_sample_depends_only_on_seed_and_index() -> None:
    """The same index gives the same sample in any order and any dataset size; another seed differs."""
    a, b = _two_modalities(n=64), _two_modalities(n=10)
    for i in (7, 3, 0):
        x, y = a[i], b[i]
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(x.items[k], y.items[k]) for k in x.items)
    assert not torch.equal(_two_modalities(seed=1)[7].input_ids, a[7].input_ids)


def test_items_text_lengths_and_special_counts() -> None:
    """Item counts take every choice; lengths vary; specials = items × tokens_per_item; labels are shifted."""
    ds = _two_modalities()
    counts, lengths = set(), set()
    for i in range(len(ds)):
        s = ds[i]
        lengths.add(s.input_ids.shape[0])
        for name, spec in ds.modalities.items():
            k = s.items[name].shape[0]
            counts.add(k)
            assert s.items[name].shape[1:] == spec.item_shape
            assert int((s.input_ids == spec.token_id).sum()) == k * spec.tokens_per_item
        assert torch.equal(s.labels[:-1], s.input_ids[1:]) and int(s.labels[-1]) == -100
    assert counts == {0, 1, 3} and len(lengths) > 10


def test_answer_token_follows_the_items_bucket() -> None:
    """The token after each item's query is the bucket of that item's mean: the rule that makes it learnable."""
    ds = SyntheticDataset(32, {"images": IMAGES}, noise=0.5)
    levels = ds.bucket_levels()
    for i in range(len(ds)):
        s = ds[i]
        answers = s.input_ids[(s.input_ids == ds.query_ids["images"]).nonzero().squeeze(1) + 1] - ds.answer_base
        nearest = (s.items["images"].double().mean(dim=(1, 2, 3))[:, None] - levels).abs().argmin(dim=1)
        assert torch.equal(answers, nearest)


def test_collated_batch_runs_through_the_tiny_llava(tiny_llava) -> None:
    """`MimoModel.forward` (and so `align_embeddings`) accepts a collated batch with 0, 1 and 3 images."""
    ds = SyntheticDataset(12, {"images": IMAGES}, dtype=torch.float64)
    batch = ds.batch(range(12))
    assert set(batch.modality_inputs["images"].items_per_sample.tolist()) == {0, 1, 3}
    with torch.no_grad():
        loss_sum, count = tiny_llava(batch.input_ids, batch.labels, batch.modality_inputs)
    assert torch.isfinite(loss_sum) and int(count) > 0


@pytest.mark.parametrize("image_id", [1, 3, 40, 63])
def test_special_ids_inside_the_vocabulary_are_skipped(image_id: int) -> None:
    """A Hugging Face model's `<image>` may be any id of its vocabulary (not only the last): the text uses every
    other id, and the image id appears only in the items' blocks."""
    data = SyntheticDataset(32, {"images": ModalitySpec.image(image_id, 4)}, vocab_size=64)
    used = set()
    for i in range(len(data)):
        sample = data[i]
        assert int((sample.input_ids == image_id).sum()) == 4 * sample.items["images"].shape[0]
        used |= set(sample.input_ids.tolist()) - {image_id}
    assert max(used) < 64 and len(used) > 40
    assert data.bos_id == (1 if image_id > 1 else 2) and data.pad_id == 0


def test_bad_settings() -> None:
    """Clashing special ids, a vocabulary with no room for filler and an index out of range are clear errors."""
    with pytest.raises(ValueError, match=r"special token ids \[200, 200\] must be distinct"):
        SyntheticDataset(4, {"images": ModalitySpec.image(200, 16), "audio": ModalitySpec.audio(200, 8)})
    with pytest.raises(ValueError, match=r"vocab_size 10 leaves fewer than 2 filler ids after 9 reserved ones"):
        SyntheticDataset(4, {"images": ModalitySpec.image(3, 16)}, vocab_size=10)
    with pytest.raises(IndexError, match=r"sample 4 is outside \[0, 4\)"):
        SyntheticDataset(4, {"images": IMAGES})[4]
