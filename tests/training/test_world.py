"""Leaving the world: every model a rank built is freed before its process groups are destroyed.

A DDP reducer that outlives its group frees the group with the GIL held and joins the group's gloo thread, which
may need the GIL to free a finished collective's tensors: the HF benchmark rows deadlocked so, in about one run of
six on a loaded 2-core machine. The deadlock itself is a race no test can hit on demand; what prevents it, the
order (body's objects freed, garbage collected, then groups destroyed), is asserted here on real gloo groups.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from mimo.testing import run_distributed


def live_ddp_at_destroy(rank: int, world_size: int) -> tuple[int, list[int]]:
    """Run a body that builds DDP over the world, in a reference cycle, then ends as the HF rows end (an object
    all-gather, a barrier); count the DDP modules alive when the world is destroyed."""
    from mimo.training import loop

    seen: list[int] = []
    destroy = dist.destroy_process_group

    def spy(*args, **kwargs) -> None:
        seen.append(sum(isinstance(o, nn.parallel.DistributedDataParallel) for o in gc.get_objects()))
        destroy(*args, **kwargs)

    def body(device) -> int:
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        model.cycle = [model]  # freed only by the collector, as a model with hooks that refer back to it
        model(torch.ones(2, 4)).sum().backward()
        gathered: list[object] = [None] * world_size
        dist.all_gather_object(gathered, rank)
        dist.barrier()
        return sum(gathered)

    dist.destroy_process_group = spy
    try:
        total = loop.run_in_world(60.0, body)
    finally:
        dist.destroy_process_group = destroy
    return total, seen


def test_run_in_world_frees_the_body_and_its_cycles_before_destroying_the_groups():
    # without the collection the cycle keeps the DDP module (and its reducer) alive: seen == [1]
    assert run_distributed(live_ddp_at_destroy, 2) == [(1, [0]), (1, [0])]
