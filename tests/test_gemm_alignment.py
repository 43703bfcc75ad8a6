"""GEMM alignment (`mimo.gemm_alignment`, `distributed.<module>.align_gemms`): a linear layer whose width is off a
multiple of 8 computes on zero-padded weights, the same function with the same gradients; `parallelize` applies it
to modules without TP. The Qwen2.5-VL parity rows (tests/training/test_qwen_parity.py, a 44-wide tower MLP and
language MLP) check whole layouts, aligned and not, against one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.gemm_alignment import align_linears, misaligned
from mimo.testing import run_distributed


@pytest.mark.parametrize("fan_in, fan_out, bias", [(12, 44, True), (44, 12, True), (13, 21, False), (16, 24, True)])
def test_a_padded_linear_computes_the_same_function_and_gradients(fan_in, fan_out, bias):
    torch.manual_seed(0)
    plain = nn.Linear(fan_in, fan_out, bias=bias, dtype=torch.float64)
    padded = nn.Linear(fan_in, fan_out, bias=bias, dtype=torch.float64)
    padded.load_state_dict(plain.state_dict())
    assert align_linears(padded) == ([""] if fan_in % 8 or fan_out % 8 else [])
    x = torch.randn(3, 5, fan_in, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [layer(xi) for layer, xi in zip((plain, padded), xs, strict=True)]
    assert outs[1].shape == outs[0].shape == (3, 5, fan_out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-13, atol=1e-13)
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-13, atol=1e-13)
    for a, b in zip(padded.parameters(), plain.parameters(), strict=True):
        assert a.shape == b.shape and a.grad.shape == b.grad.shape  # parameters keep their shapes
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-13)


def test_only_plain_misaligned_linear_layers_are_padded():
    class Float8LikeLinear(nn.Linear):  # a subclass (torchao's Float8Linear) computes its own way: left alone
        pass

    model = nn.ModuleDict({"square": nn.Linear(16, 16), "wide": nn.Linear(16, 3420), "narrow": nn.Linear(3420, 16),
                           "converted": Float8LikeLinear(16, 20), "conv": nn.Conv1d(3, 5, 1)})
    assert [misaligned(m) for m in model.values()] == [False, True, True, False, False]
    assert align_linears(model) == ["wide", "narrow"]
    assert "forward" not in vars(model["square"]) and "forward" in vars(model["wide"])


def aligned_layers(rank: int, world_size: int, layout: dict, align: bool) -> dict[str, list[str]]:
    """Which linear layers of each hosted module `parallelize` padded, on a tiny Qwen2.5-VL whose MLPs are 44 wide."""
    from tests.training.test_qwen_parity import provider

    model = provider("qwen2_5_vl", layout).provide_distributed_model(
        DistributedConfig(ModuleDistributedConfig("ddp", align_gemms=align)))
    modules = {"images": model.modality_submodules["images"], "language": model.language_model}
    return {name: sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if "forward" in vars(m)
                         and isinstance(m, nn.Linear)}) for name, module in modules.items() if module is not None}


def test_parallelize_pads_the_modules_without_tensor_parallelism():
    layout = {"images": {"data_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}}
    on, off = (run_distributed(aligned_layers, 2, layout, align) for align in (True, False))
    mlp = ["down_proj", "gate_proj", "up_proj"]
    assert on[0] == on[1] == {"images": mlp, "language": []}  # the TP2 language model keeps its DTensor shards
    assert off[0] == off[1] == {"images": [], "language": []}
