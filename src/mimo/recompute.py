"""Activation recomputation (Megatron's `recompute_granularity: full`): a block keeps only its inputs in the
forward and runs its forward again in the backward, so its activations cost no memory between the two.

Applied from outside, per `layers.N` block, like compile and TP: the model code knows nothing of it. It is
torch's non-reentrant `torch.utils.checkpoint`: the autograd graph is the forward's own (gradients reach the
same parameters, DDP's and FSDP2's hooks fire as without it); only the tensors a block saved for its backward
are dropped and made again, under the forward's autocast and RNG state, so the gradients are bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

# What the recomputation runs inside, for a block whose parameters are not as its forward saw them (DDP over
# TP: local shards outside the module's forward, DTensors inside): `mimo.ddp_shards.dtensor_params`.
Around = Callable[[nn.Module], AbstractContextManager[None]]


def recompute_blocks(blocks: Sequence[nn.Module], around: Around | None = None) -> None:
    """Make each block's forward a checkpointed one (in place: parameter names and hooks do not change)."""
    for block in blocks:
        block.forward = _checkpointed(block, block.forward, around)


def _checkpointed(block: nn.Module, forward: Callable[..., Any], around: Around | None) -> Callable[..., Any]:
    """`forward` run under `checkpoint`, inside `around(block)` when given (a no-op in the forward itself)."""
    run = forward if around is None else functools.partial(_inside, around, block, forward)

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed


def _inside(around: Around, block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with around(block):
        return forward(*args, **kwargs)


def recomputed(blocks: Sequence[nn.Module], num_layers: int | None) -> list[nn.Module]:
    """The blocks that recompute: the first `num_layers` of a module's stage (Megatron's `block` method; all of
    them if None or more than there are). Fewer trade less memory saved for less time spent."""
    return list(blocks if num_layers is None else blocks[:num_layers])

