"""Compiled decoder blocks and packed rows of many lengths: a bounded number of compilations, flex_attention
compiled. flex_attention has no CPU backward, so this runs forward only, on CPU, with the flex variant the
CUDA path uses (`tests/models/test_packed_attention_cuda.py` trains it on a GPU)."""

from __future__ import annotations

import warnings

import torch

import mimo.models.decoder as decoder_module
from mimo.models import Decoder, DecoderConfig, init_parameters
from mimo.models.attention import FlexDocumentAttention


def _packed_inputs(length: int) -> dict[str, torch.Tensor]:
    """A row of `length` positions holding two documents (a third and the rest)."""
    cut = length // 3
    sizes = (cut, length - cut)
    return {"input_ids": torch.randint(1, 256, (1, length)),
            "position_ids": torch.cat([torch.arange(n) for n in sizes]).unsqueeze(0),
            "document_ids": torch.repeat_interleave(torch.arange(2), torch.tensor(sizes)).unsqueeze(0)}


def test_compiled_blocks_compile_a_bounded_number_of_times_over_packed_lengths(monkeypatch):
    """Padded rows (causal) then ten packed lengths (document flex): each compiled frame at most 3 times
    (static, dynamic, the packed variant) whatever the number of lengths, and flex_attention never eager."""
    monkeypatch.setattr(decoder_module, "document_attention", lambda ids, *_: FlexDocumentAttention(ids))
    torch._dynamo.reset()
    decoder = Decoder(DecoderConfig.tiny(max_seq_len=2048))
    init_parameters(decoder, seed=1)
    for layer in decoder.layers.values():
        layer.compile()
    try:
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True), \
                warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
            for length in (40, 64, 96):
                decoder(input_ids=torch.randint(1, 256, (2, length)))
            for length in range(128, 1281, 128):
                decoder(**_packed_inputs(length))
    finally:
        torch._dynamo.reset()


def test_rows_written_with_modality_embeddings_compile_the_blocks_no_more_than_text_rows():
    """The first layer's input after modality rows are written into the embeddings, and every later layer's input,
    are tensors of their own: were the first a view of the flattened rows (the `_base` every compiled frame guards
    on), the block would compile once more for it. Two lengths: a static graph and a dynamic one, no third."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    decoder = Decoder(DecoderConfig.tiny())
    init_parameters(decoder, seed=1)
    for layer in decoder.layers.values():
        layer.compile(backend="eager")
    before = counters["stats"]["unique_graphs"]  # the process's count: other tests compiled before
    try:
        with torch.no_grad():
            for length in (24, 40):
                ids = torch.randint(1, 256, (2, length))
                where = torch.tensor([1, 2, length + 3])  # flat indices into B·S: rows 0 and 1
                decoder(input_ids=ids, embeddings_at=[(where, torch.randn(3, 64))])
        assert counters["stats"]["unique_graphs"] - before == 2, counters["stats"]
    finally:
        torch._dynamo.reset()
