"""On a GPU (skipped without one): flash attention's varlen kernel and compiled flex_attention with the document
block mask equal the explicit-mask SDPA, forward and backward, and a packed decoder row scores like its padded
samples (compiled blocks too, without recompiling per length)."""

from __future__ import annotations

import pytest
import torch

import mimo.models.attention as attention_module
from mimo.data import MimoBatch, Sample, next_token_labels
from mimo.data.packing import PackedText
from mimo.models import Decoder, DecoderConfig, init_parameters
from mimo.models.attention import (
    FlexDocumentAttention,
    MaskedDocumentAttention,
    VarlenDocumentAttention,
    document_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_flex_document_attention_matches_the_explicit_mask_forward_and_backward():
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([10, 300, 5, 200, 85, 250, 150])  # 1000 positions, blocks cut mid-document
    docs = torch.repeat_interleave(torch.arange(7), lengths).unsqueeze(0).cuda()
    q, k, v = (torch.randn(1, h, 1000, 64, device="cuda", generator=gen, requires_grad=True) for h in (8, 4, 4))
    results = []
    for attention in (FlexDocumentAttention(docs), MaskedDocumentAttention(docs)):
        out = attention(q, k, v)
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 1e-4, f"{name}: flex differs from the explicit mask by {rel:.1e} (float32)"


def test_varlen_document_attention_matches_the_explicit_mask_in_bf16_forward_and_backward():
    """Two rows, documents cut anywhere, grouped-query heads: flash's varlen kernel (bf16 only) against the
    explicit mask in float32 on the same bf16 inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    row_docs = [torch.tensor([10, 300, 5, 200, 85, 250, 150]), torch.tensor([1000])]
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(n)), n) for n in row_docs]).cuda()
    q, k, v = (torch.randn(2, h, 1000, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
               for h in (8, 4, 4))
    results = []
    for attention, cast in ((VarlenDocumentAttention(docs), torch.bfloat16), (MaskedDocumentAttention(docs),
                                                                              torch.float32)):
        inputs = [t.to(cast) for t in (q, k, v)]
        out = attention(*inputs).float()
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        assert rel < 2e-2, f"{name}: varlen differs from the explicit mask by {rel:.1e} (bf16)"


def test_cuda_document_ids_get_the_varlen_kernel_or_flex_when_asked(monkeypatch):
    ids = torch.zeros(1, 128, dtype=torch.long, device="cuda")
    assert isinstance(document_attention(ids, torch.bfloat16), VarlenDocumentAttention)
    assert isinstance(document_attention(ids, torch.float32), FlexDocumentAttention)  # flash has no float32
    monkeypatch.setattr(attention_module, "CUDA_DOCUMENT_KERNEL", "flex")
    assert isinstance(document_attention(ids, torch.bfloat16), FlexDocumentAttention)


def test_packed_row_scores_like_the_padded_samples_on_the_gpu():
    decoder = Decoder(DecoderConfig.tiny(max_seq_len=256)).cuda()
    init_parameters(decoder, seed=4)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for n in (3, 170, 40, 90):
        ids = torch.randint(1, 256, (n,), generator=gen)
        samples.append(Sample(ids, next_token_labels(ids)))
    batch = MimoBatch.collate(samples, pad_id=0)
    text = PackedText(multiple=128).arrange(batch, {}).to("cuda")
    padded, _ = decoder(input_ids=batch.input_ids.cuda(), labels=batch.labels.cuda())
    packed, _ = decoder(input_ids=text.input_ids, labels=text.labels, **text.model_kwargs())
    assert abs(float(packed) - float(padded)) <= 1e-4 * abs(float(padded))


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_compiled_blocks_train_packed_rows_of_many_lengths_without_recompiling_per_length(kernel, monkeypatch):
    """`train.compile` with packing, bf16 autocast: padded rows, then ten packed lengths, forward and backward;
    every compiled frame at most 3 times (the limit raises instead of falling back to eager) and flex_attention
    never eager."""
    import warnings

    monkeypatch.setattr(attention_module, "CUDA_DOCUMENT_KERNEL", kernel)
    from tests.models.test_packed_compile import _packed_inputs

    torch._dynamo.reset()
    decoder = Decoder(DecoderConfig.tiny(max_seq_len=2048)).cuda()
    init_parameters(decoder, seed=1)
    for layer in decoder.layers.values():
        layer.compile()
    try:
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True), \
                warnings.catch_warnings(), torch.autocast("cuda", torch.bfloat16):
            warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
            for length in (40, 64, 96):
                ids = torch.randint(1, 256, (2, length), device="cuda")
                decoder(input_ids=ids, labels=ids)[0].backward()
            for length in range(128, 1281, 128):
                inputs = {k: v.cuda() for k, v in _packed_inputs(length).items()}
                decoder(**inputs, labels=inputs["input_ids"])[0].backward()
    finally:
        torch._dynamo.reset()
