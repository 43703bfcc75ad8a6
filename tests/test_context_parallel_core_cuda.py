"""On a GPU (skipped without one): the context-parallel core's CUDA path, compiled flex_attention over the block
mask, equals the explicit-mask SDPA core in the forward and in the q, k, v gradients (what the CPU suite cannot
run: flex has no CPU backward, and its eager CPU path reads no block table). The layouts are
`tests/test_context_parallel_core.py`'s (packed and padded rows at CP2 and CP4, rows with their own documents)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mimo.context_parallel import ContextParallelAttention, split_text, uses_flex
from tests.test_context_parallel_core import layouts, packed_text

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


def test_the_training_path_gathers_then_runs_the_flex_core(tmp_path, monkeypatch):
    """`ContextText.attention()` of a packed row moved to the GPU, in a one-rank NCCL world (the all-gather and its
    reduce-scatter backward run), under bf16 autocast with rotary's float32 q, k and a bf16 v, as a decoder layer
    calls it: the call runs the flex core once and matches the float32 explicit mask, forward and gradients."""
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=device)
    try:
        attention = split_text(packed_text(), 0, 1).to(device).attention()
        flex_core, calls = attention.flex_core, []
        monkeypatch.setattr(attention, "flex_core", lambda *a, **kw: calls.append(1) or flex_core(*a, **kw))
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = tuple(torch.randn(1, h, attention.keys, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
                       for h, dtype in ((8, torch.float32), (4, torch.float32), (4, torch.bfloat16)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attention(*inputs).float()
        got = [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]
    finally:
        dist.destroy_process_group()
    want = core_results(attention, "masked_core", inputs, torch.float32)
    assert calls == [1]
    for part, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        rel = float((g.float() - w.float()).abs().max() / w.float().abs().max())
        assert rel < 2e-2, f"{part}: the CP call differs from the explicit mask by {rel:.1e} (bf16 autocast)"
