"""Document-causal attention and per-token positions: a packed row scores exactly like its padded samples."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mimo.data import MimoBatch, Sample, next_token_labels
from mimo.data.packing import PackedText
from mimo.models import Decoder, DecoderConfig, init_parameters
from mimo.models.attention import (
    FlexDocumentAttention,
    MaskedDocumentAttention,
    VarlenDocumentAttention,
    document_attention,
)

DOCS = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2 + [3] * 4])  # four documents in a row of 20


def _qkv(length: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, length, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, length, 8, generator=gen, dtype=torch.float64)
    return q, k, v


def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each document's causal attention on its own, concatenated."""
    bounds = torch.unique_consecutive(DOCS[0], return_counts=True)[1].cumsum(0).tolist()
    outs, start = [], 0
    for end in bounds:
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                   is_causal=True, enable_gqa=True))
        start = end
    return torch.cat(outs, dim=2)


def test_masked_document_attention_is_causal_attention_per_document():
    q, k, v = _qkv()
    torch.testing.assert_close(MaskedDocumentAttention(DOCS)(q, k, v), _per_document(q, k, v), rtol=1e-12, atol=1e-12)


def test_flex_block_mask_keeps_what_the_explicit_mask_keeps():
    """The flex variant's block mask, run through eager flex_attention (forward only: it has no CPU backward;
    the compiled kernel is the GPU's, exercised by benchmarks/packing.py)."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out = flex_attention(q, k, v, block_mask=FlexDocumentAttention(DOCS).block_mask, enable_gqa=True)
    torch.testing.assert_close(out, _per_document(q, k, v), rtol=1e-12, atol=1e-12)


def test_varlen_bounds_are_each_documents_start_with_rows_end_to_end():
    """The varlen kernel's cumulative lengths (its CUDA kernel: tests/models/test_packed_attention_cuda.py): every
    document's first token, a new row starting a new document even with the same id, then the total."""
    docs = torch.cat([DOCS, torch.tensor([[0] * 12 + [1] * 8])])
    assert VarlenDocumentAttention(docs).cu_seqlens.tolist() == [0, 5, 14, 16, 20, 32, 40]


def test_packed_text_finds_its_bounds_on_the_host_and_gives_them_to_the_decoder():
    """A packed micro-batch's bounds are found where its rows are arranged, before any copy to a GPU, so the
    varlen attention there takes them as they are instead of reading a count back (one sync per micro-batch)."""
    text = PackedText().arrange(MimoBatch.collate(_samples(), pad_id=0), {})
    assert text.document_bounds.tolist() == VarlenDocumentAttention(text.document_ids).cu_seqlens.tolist()
    assert text.document_bounds.tolist() == [0, 2, 18, 26]  # lengths 3, 17, 9 packed as 2, 16 and 8 positions
    assert text.model_kwargs()["document_bounds"] is text.document_bounds
    given = torch.tensor([0, 7, 20], dtype=torch.int32)
    assert VarlenDocumentAttention(DOCS, given).cu_seqlens is given


def test_cpu_tensors_get_the_explicit_mask():
    assert isinstance(document_attention(DOCS), MaskedDocumentAttention)


def _samples() -> list[Sample]:
    """Lengths 3, 17 and 9 (very different), next-token labels."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in (3, 17, 9):
        ids = torch.randint(1, 256, (n,), generator=gen)
        out.append(Sample(ids, next_token_labels(ids)))
    return out


def _loss_and_grads(decoder: Decoder, **inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    decoder.zero_grad()
    loss, _ = decoder(**inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}


def test_packed_row_scores_and_differentiates_like_the_padded_samples():
    decoder = Decoder(DecoderConfig.tiny(max_seq_len=24)).double()
    init_parameters(decoder, seed=4)
    batch = MimoBatch.collate(_samples(), pad_id=0)
    text = PackedText(multiple=8).arrange(batch, {})
    assert text.input_ids.shape[1] == 32  # a packed row may be longer than max_seq_len: its positions restart
    padded_loss, padded = _loss_and_grads(decoder, input_ids=batch.input_ids, labels=batch.labels)
    packed_loss, packed = _loss_and_grads(decoder, input_ids=text.input_ids, labels=text.labels,
                                          **text.model_kwargs())
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-12, atol=0)
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-10, atol=1e-14, msg=name)


def test_without_document_ids_samples_would_see_each_other():
    """The parity above can fail: the same row with attention across samples scores differently."""
    decoder = Decoder(DecoderConfig.tiny(max_seq_len=64)).double()
    init_parameters(decoder, seed=4)
    batch = MimoBatch.collate(_samples(), pad_id=0)
    text = PackedText().arrange(batch, {})
    with torch.no_grad():
        isolated, _ = decoder(input_ids=text.input_ids, labels=text.labels, **text.model_kwargs())
        mixed, _ = decoder(input_ids=text.input_ids, labels=text.labels, position_ids=text.position_ids)
    assert abs(float(isolated) - float(mixed)) > 1e-3
