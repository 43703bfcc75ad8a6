"""Tensor parallelism for a fused projection whose output is equal parts side by side (a ViT's q|k|v `qkv`).

The weight is column-sharded as plain `ColwiseParallel` shards it (contiguous rows of Hugging Face's layout, so
checkpoints, `HFWeights` and resumption on another TP size see an ordinary `Shard(0)`), but a contiguous slice of
[q | k | v] is the wrong thing to attend with: on TP2 rank 0 would hold all of q's heads and none of v's. So the
output is all-gathered and each rank keeps its own heads of every part: its local output is
[q heads of rank r | k heads of rank r | v heads of rank r], which the model's reshape to (parts, heads, head_dim)
reads as its heads. The gradient goes back as a reduce-scatter (the gather's transpose: each rank's gradient is
declared `Partial`, zero outside its heads). Cost: one all-gather of the projection's output per layer forward and
one reduce-scatter backward, where Megatron's head-interleaved layout needs none; the price of keeping the layout
every Hugging Face checkpoint has. A plan entry only: `parallelize_module` applies it from outside the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel


class FusedColwiseParallel(ColwiseParallel):
    """Column parallelism of an nn.Linear whose output is `parts` equal parts; each rank ends with its heads of
    every part, side by side."""

    def __init__(self, parts: int) -> None:
        """`parts`: how many equal parts the output holds (3 for q|k|v)."""
        super().__init__()
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Shard weight and bias by rows; replicate the input in; hand on this rank's slice of every part."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"FusedColwiseParallel shards an nn.Linear, not {type(module).__name__}")
        part = module.out_features // self.parts
        if module.out_features % self.parts or part % device_mesh.size():
            raise ValueError(f"a fused projection of {module.out_features} outputs in {self.parts} parts does not "
                             f"split over {device_mesh.size()} ranks part by part")
        parts = self.parts

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]), requires_grad=param.requires_grad)
                mod.register_parameter(key, sharded)

        def replicated_input(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            x, *rest = inputs
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            return (x, *rest)

        def own_heads(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            full = output.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            return full.unflatten(-1, (parts, mesh.size(), -1))[..., mesh.get_local_rank(), :].flatten(-2)

        return distribute_module(module, device_mesh, partition, replicated_input, own_heads)
