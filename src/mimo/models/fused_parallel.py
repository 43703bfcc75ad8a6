"""Tensor parallelism for a fused projection whose output is equal parts side by side (a ViT's q|k|v `qkv`).

Plain `ColwiseParallel` would give rank r the r-th contiguous slice of all 3·H outputs: all of q's heads and none
of v's on TP2. `FusedColwiseParallel(parts)` shards each part separately instead, so every rank's local output is
[its q heads | its k heads | its v heads] and a model reshaping the output to (parts, heads, head_dim) reads its
own heads, with no communication. The parameters' global view stays the unsharded layout (Hugging Face's), so
checkpoints, resumption on another TP size and export see the weights as they are. A plan entry only:
`parallelize_module` applies it from outside the model.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel

from mimo.torch_compat import strided_shard


class FusedColwiseParallel(ColwiseParallel):
    """Column parallelism of an nn.Linear whose outputs are `parts` equal parts, each part sharded by heads."""

    def __init__(self, parts: int) -> None:
        """`parts`: how many equal parts the output holds (3 for q|k|v)."""
        super().__init__()
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Shard weight and bias part by part; replicate the input in, hand the local output on."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"FusedColwiseParallel shards an nn.Linear, not {type(module).__name__}")
        placement = [strided_shard(0, self.parts)]

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                sharded = nn.Parameter(distribute_tensor(param, mesh, placement), requires_grad=param.requires_grad)
                mod.register_parameter(key, sharded)

        def replicated_input(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            x, *rest = inputs
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            return (x, *rest)

        def local_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> Any:
            return output.to_local()

        return distribute_module(module, device_mesh, partition, replicated_input, local_output)
