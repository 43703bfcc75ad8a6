"""mimo.torch_compat: the mends for older torch releases, checked on whatever torch runs the suite.

The bug itself lives in torch 2.11 (the GPU machine's) and CI runs a later torch, where the mend stands aside; so
the mend's own logic is checked here with the later torch's fix hidden. On 2.11 the sequence-parallel tests
(13 text tokens and a ViT's 17 over TP2: uneven shards) fail without it.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import _redistribute
from torch.distributed.tensor.placement_types import Shard

from mimo.torch_compat import contiguous_uneven_gathers


def test_an_uneven_gather_is_narrowed_to_a_contiguous_tensor_where_torch_lacks_the_fix(monkeypatch):
    monkeypatch.delattr(_redistribute, "NestedRedistribute", raising=False)
    monkeypatch.setattr(Shard, "_maybe_unpad_tensor", Shard._maybe_unpad_tensor)  # put back after the test
    contiguous_uneven_gathers()
    contiguous_uneven_gathers()  # once is enough: a second call does not wrap the mend again
    assert Shard._maybe_unpad_tensor.mimo_contiguous
    gathered = torch.arange(2 * 14 * 3, dtype=torch.float64).reshape(2, 14, 3)  # 13 tokens over 2 ranks, padded
    out = Shard(1)._maybe_unpad_tensor(gathered, 13, 2)
    assert out.shape == (2, 13, 3) and out.is_contiguous() and torch.equal(out, gathered[:, :13])
    even = torch.zeros(2, 14, 3)
    assert Shard(1)._maybe_unpad_tensor(even, 14, 2) is even  # nothing padded: no copy


def test_torch_with_the_fix_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(_redistribute, "NestedRedistribute", object(), raising=False)
    before = Shard._maybe_unpad_tensor
    monkeypatch.setattr(Shard, "_maybe_unpad_tensor", before)
    contiguous_uneven_gathers()
    assert Shard._maybe_unpad_tensor is before
