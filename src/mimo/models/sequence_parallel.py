"""The pieces of a sequence-parallel TP plan (Megatron's `sequence_parallel`), shared by every block stack.

Between the first block's input and the last block's output a TP module's activations are DTensors sharded
along the sequence (dim 1 of [batch, sequence, hidden]): norms and residual adds run on this rank's tokens, the
attention and the MLP all-gather their input (one all-gather each) and their row-sharded output projection
reduce-scatters instead of all-reducing. The stack's input arrives replicated and is sliced (no traffic); its
output is gathered back, so nothing outside the blocks (embedding, modality rows, pipeline sends, the head)
sees a sharded tensor. These are plan entries only: `parallelize_module` applies them from outside the model.
DTensors carry their global shape, so a sequence that does not divide by TP (577 ViT tokens) shards unevenly
(torch.chunk's split) and is gathered back exactly (on torch 2.11 too: `torch_compat.contiguous_uneven_gathers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from mimo.torch_compat import contiguous_uneven_gathers

contiguous_uneven_gathers()  # torch 2.11's uneven sequence gathers, mended before any plan is built

SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden] (a packed row is [1, T, hidden])


def _layouts(first: Replicate | Shard, num_args: int) -> tuple[Replicate | Shard | None, ...]:
    """A layout for the first positional argument (the activations); the others (rotary tables, the
    attention variant) pass through untouched."""
    return (first, *([None] * (num_args - 1)))


def sharded_norm() -> ParallelStyle:
    """A norm on this rank's tokens (its weight replicated); output stays a sequence-sharded DTensor."""
    return SequenceParallel(sequence_dim=SEQUENCE_DIM)


def gathered_input(num_args: int = 1) -> ParallelStyle:
    """All-gather the sequence before a sublayer (attention, MLP): its column-sharded projections see every token."""
    return PrepareModuleInput(input_layouts=_layouts(Shard(SEQUENCE_DIM), num_args),
                              desired_input_layouts=_layouts(Replicate(), num_args), use_local_output=True)


def scattered_output() -> ParallelStyle:
    """A row-sharded output projection that reduce-scatters along the sequence instead of all-reducing."""
    return RowwiseParallel(output_layouts=Shard(SEQUENCE_DIM), use_local_output=False)


def stack_boundaries(blocks: Sequence[str], num_args: int = 1) -> dict[str, ParallelStyle]:
    """The first block slices its replicated input along the sequence, the last gathers its output back.

    `blocks` are the stack's block names in call order; `num_args` how many positional arguments a block takes.
    """
    if not blocks:
        return {}
    shard_in = {"input_layouts": _layouts(Replicate(), num_args),
                "desired_input_layouts": _layouts(Shard(SEQUENCE_DIM), num_args)}
    gather_out = {"output_layouts": Shard(SEQUENCE_DIM), "desired_output_layouts": Replicate(),
                  "use_local_output": True}
    if len(blocks) == 1:
        return {blocks[0]: PrepareModuleInputOutput(**shard_in, use_local_input=False, **gather_out)}
    return {blocks[0]: PrepareModuleInput(**shard_in, use_local_output=False),
            blocks[-1]: PrepareModuleOutput(**gather_out)}


def takes_sequence_parallel(module: nn.Module) -> bool:
    """Whether `module.tp_plan` accepts `sequence_parallel` (a user's module may have a plan without it)."""
    return "sequence_parallel" in inspect.signature(module.tp_plan).parameters
