"""Alignment of modality embeddings into the text sequence: positions, values, errors, gradients."""

from __future__ import annotations

import pytest
import torch

from mimo.models import Decoder, DecoderConfig, MimoModel, init_parameters

IMAGE_ID, AUDIO_ID = 1000, 1001  # beyond the vocabulary on purpose: they must never be looked up
TOKENS_PER_IMAGE, TOKENS_PER_CLIP = 2, 3


def _model() -> MimoModel:
    """A float64 tiny decoder with two (encoder-less) modalities; only the alignment is exercised."""
    decoder = Decoder(DecoderConfig.tiny()).double()
    init_parameters(decoder, seed=0)
    return MimoModel(decoder, None, {"images": IMAGE_ID, "audio": AUDIO_ID})


def _batch() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """3 samples with 0, 1 and 3 images (2 tokens each) and 1, 0, 1 clips; specials not contiguous."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 16), generator=gen)
    image_positions = {0: [], 1: [3, 4], 2: [1, 2, 6, 7, 12, 15]}
    audio_positions = {0: [5, 6, 9], 1: [], 2: [8, 9, 10]}
    for b in range(3):
        ids[b, image_positions[b]] = IMAGE_ID
        ids[b, audio_positions[b]] = AUDIO_ID
    per_sample = {
        "images": torch.tensor([0, 1, 3]) * TOKENS_PER_IMAGE,
        "audio": torch.tensor([1, 0, 1]) * TOKENS_PER_CLIP,
    }
    embeddings = {
        name: torch.randn(int(n.sum()), 64, dtype=torch.float64, generator=gen, requires_grad=True)
        for name, n in per_sample.items()
    }
    return ids, embeddings, per_sample


def test_modality_embeddings_land_in_order_and_text_keeps_its_embedding() -> None:
    """Row k of a modality's embeddings goes to its k-th special position in row-major (sample) order."""
    model = _model()
    ids, embeddings, per_sample = _batch()
    out = model.align_embeddings(ids, embeddings, per_sample)
    assert out.shape == (3, 16, 64)
    for name, token_id in (("images", IMAGE_ID), ("audio", AUDIO_ID)):
        positions = (ids == token_id).nonzero().tolist()
        assert len(positions) == embeddings[name].shape[0]
        for k, (b, t) in enumerate(positions):
            assert torch.equal(out[b, t], embeddings[name][k])
    text = ~torch.isin(ids, torch.tensor([IMAGE_ID, AUDIO_ID]))
    table = model.language_model.embed_tokens.weight
    assert torch.equal(out[text], table[ids[text]])


def test_sample_without_any_modality_is_pure_text() -> None:
    """A batch with no modality input at all is the plain embedding lookup."""
    model = _model()
    ids = torch.randint(0, 256, (2, 8))
    out = model.align_embeddings(ids, {}, {})
    assert torch.equal(out, model.language_model.embed_tokens.weight[ids])


def test_count_mismatch_names_sample_modality_and_both_counts() -> None:
    """One special token too many in sample 2 is reported with the sample, modality and both counts."""
    model = _model()
    ids, embeddings, per_sample = _batch()
    ids[2, 0] = IMAGE_ID
    with pytest.raises(ValueError, match=r"sample 2: 7 special tokens for modality 'images'.*but 6 'images'"):
        model.align_embeddings(ids, embeddings, per_sample)


def test_special_tokens_without_embeddings_are_an_error() -> None:
    """Audio tokens in the text but no audio embeddings at all: the expected count is 0."""
    model = _model()
    ids, embeddings, per_sample = _batch()
    del embeddings["audio"], per_sample["audio"]
    with pytest.raises(ValueError, match=r"sample 0: 3 special tokens for modality 'audio'.*but 0 'audio'"):
        model.align_embeddings(ids, embeddings, per_sample)


def test_gradient_reaches_text_embedding_and_modality_embeddings() -> None:
    """d(out·w)/d(modality row k) = w at its position; the embedding table gets text positions only."""
    model = _model()
    ids, embeddings, per_sample = _batch()
    out = model.align_embeddings(ids, embeddings, per_sample)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    for name, token_id in (("images", IMAGE_ID), ("audio", AUDIO_ID)):
        assert torch.equal(embeddings[name].grad, weights[ids == token_id])
    text = ~torch.isin(ids, torch.tensor([IMAGE_ID, AUDIO_ID]))
    expected = torch.zeros(256, 64, dtype=torch.float64).index_add_(0, ids[text], weights[text])
    torch.testing.assert_close(model.language_model.embed_tokens.weight.grad, expected, rtol=1e-12, atol=0)


def test_labels_on_and_towards_modality_positions_are_ignored() -> None:
    """A label at a special position, or a label that is a special id, never counts."""
    model = _model()
    ids, embeddings, per_sample = _batch()
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    aligned = model.align_embeddings(ids, embeddings, per_sample)
    _, count = model.language_loss(aligned, ids, labels)
    specials = torch.isin(ids, torch.tensor([IMAGE_ID, AUDIO_ID]))
    keep = ~specials & ~torch.isin(labels, torch.tensor([IMAGE_ID, AUDIO_ID, -100]))
    assert int(count) == int(keep.sum())


def test_positions_from_the_host_ids_match_the_mask_in_values_and_gradients() -> None:
    """The trainer passes the CPU ids (`host_ids`): flat positions and `index_copy` instead of a mask and
    `masked_scatter`, the same copy with a backward that needs no host sync on a GPU."""
    results = []
    for host_ids in (False, True):
        model = _model()
        ids, embeddings, per_sample = _batch()
        inputs = model.language_inputs(ids, embeddings, per_sample, host_ids=ids.clone() if host_ids else None)
        assert all((where.dtype == torch.bool) != host_ids for where, _ in inputs["embeddings_at"])
        out = model.language_model.embed(**inputs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), embeddings["images"].grad, embeddings["audio"].grad,
                        model.language_model.embed_tokens.weight.grad))
    for mask_result, positions_result in zip(*results, strict=True):
        assert torch.equal(mask_result, positions_result)
