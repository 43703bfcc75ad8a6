"""GEMM alignment: a linear layer whose width is not a multiple of 8 elements computes on zero-padded weights.

cuBLAS's Hopper kernels read rows through 16-byte-aligned strides; a bf16 matrix 3420 elements wide (Qwen2.5-VL's
vision MLP) has none, and its GEMMs fall back to an sm80 kernel at about a third of the speed (H100: 220 against
730 TFLOP/s, `benchmarks/qwen_speed.py`'s notes in RESULTS.md). Zero rows appended to the weight (output features,
with zero bias) or zero columns (input features, the input padded to match) leave every product as it was, so the
layer computes the same function; its parameters keep their shapes, so checkpoints, Hugging Face loading, the
optimizer and gradient clipping see no difference, and the padding's gradients are dropped by the pad's backward.

Applied from outside (`mimo.distributed.parallelize`), like compile and recomputation, to plain `nn.Linear`s of a
module without tensor parallelism (a TP module's weights are DTensors, whose shards the TP plan lays out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# elements: 16 bytes in bf16/fp16, the dtypes GPUs train in (one rule for every dtype, so CPU tests reach it)
ALIGN = 8


def padding(width: int) -> int:
    """Elements to append so `width` is a multiple of `ALIGN`."""
    return -width % ALIGN


def misaligned(layer: nn.Module) -> bool:
    """A plain linear layer (not a subclass such as torchao's Float8Linear) with a width off the alignment."""
    return type(layer) is nn.Linear and bool(padding(layer.in_features) or padding(layer.out_features))


def align_linears(module: nn.Module) -> list[str]:
    """Every misaligned linear layer of `module` computes on padded weights (its forward replaced in place: names,
    parameters and hooks unchanged); returns their names."""
    names = []
    for name, layer in module.named_modules():
        if misaligned(layer):
            layer.forward = aligned_forward(layer)
            names.append(name)
    return names


def aligned_forward(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """`layer`'s forward on weights padded to aligned widths: the output sliced back to `out_features`."""
    pad_in, pad_out = padding(layer.in_features), padding(layer.out_features)
    width = layer.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = F.pad(layer.weight, (0, pad_in, 0, pad_out))
        bias = None if layer.bias is None else F.pad(layer.bias, (0, pad_out))
        out = F.linear(F.pad(x, (0, pad_in)) if pad_in else x, weight, bias)
        return out[..., :width] if pad_out else out

    return forward
