"""On a GPU (skipped without one): the context-parallel core's CUDA path, compiled flex_attention over the block
mask, equals the explicit-mask SDPA core in the forward and in the q, k, v gradients (what the CPU suite cannot
run: flex has no CPU backward, and its eager CPU path reads no block table). The layouts are
`tests/test_context_parallel_core.py`'s (packed and padded rows at CP2 and CP4, rows with their own documents)."""

from __future__ import annotations

import pytest
import torch

from mimo.context_parallel import ContextParallelAttention, uses_flex
from tests.test_context_parallel_core import layouts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def core_results(attention: ContextParallelAttention, core: str, inputs: tuple[torch.Tensor, ...],
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """The core's output and the gradients of its squares' sum with respect to the leaves `inputs`."""
    q, k, v = (t.to(dtype) for t in inputs)
    out = getattr(attention, core)(q, k, v).float()
    return [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize("dtype, tolerance, cases", [(torch.bfloat16, 2e-2, None), (torch.float32, 1e-4, 2)])
def test_flex_core_matches_the_masked_core_forward_and_backward(dtype, tolerance, cases):
    """Compiled flex in bf16 (the training dtype) against the float32 explicit mask on the same bf16 inputs, every
    layout; float32 against float32 on the first two (CP2's packed rank 0, padded rank 0: fewer compilations). The
    tolerances of the decoder's packed flex and varlen tests."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, attention, length, rows in list(layouts("cuda"))[:cases]:
        inputs = tuple(torch.randn(rows, h, n, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
                       for h, n in ((8, length), (4, attention.keys), (4, attention.keys)))
        got = core_results(attention, "flex_core", inputs, dtype)
        want = core_results(attention, "masked_core", inputs, torch.float32)
        for part, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            rel = float((g.float() - w.float()).abs().max() / w.float().abs().max())
            assert rel < tolerance, f"{name} {part}: flex differs from the explicit mask by {rel:.1e} ({dtype})"


def test_wide_heads_take_flex_and_narrow_ones_the_masked_core():
    """Compiled flex needs heads of 16 or more: the tiny test models' narrower heads keep SDPA."""
    assert uses_flex(torch.zeros(1, 1, 4, 64, device="cuda"))
    assert not uses_flex(torch.zeros(1, 1, 4, 8, device="cuda"))
