"""Every point-to-point channel a step uses is opened before the first step (DESIGN §3 "Process groups").

On NCCL a pair's communicator is created at its first send or receive and needs both ranks; created inside a
step, it deadlocked a heterogeneous run whose encoder rank sat in a host sync (issue: the deployments
benchmark's phase timer). The trainer opens the pairs of its bridges and pipeline up front
(`P2PGroups.warm_up`); here gloo records every peer a real step sends to or receives from, and each must be a
pair opened before, and each opened pair must be used (no communicator made for nothing).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from mimo.testing import run_distributed
from mimo.training.step import MimoTrainer
from tests.training.test_parity import GLOBAL_BATCH, MICRO, batches, provider


def _recording(fn, used: set[tuple[int, int]]):
    """`fn` (a dist point-to-point call) that also notes the pair of ranks it talks between."""
    @functools.wraps(fn)
    def call(tensor, *args, **kwargs):
        peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
        me = dist.get_rank()
        used.add((min(me, peer), max(me, peer)))
        return fn(tensor, *args, **kwargs)
    return call


def _pairs_used_in_a_step(rank: int, world_size: int, layout: dict) -> dict:
    prov = provider(layout, ("images",))
    model = prov.provide_distributed_model()
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, activation_dtype=torch.float64)
    used: set[tuple[int, int]] = set()
    patch = pytest.MonkeyPatch()
    for name in ("send", "recv", "isend", "irecv"):
        patch.setattr(dist, name, _recording(getattr(dist, name), used))
    try:
        trainer.train_step(batches(("images",))[0])
    finally:
        patch.undo()
    mine = {pair for pair in trainer.p2p_pairs if rank in pair}
    return {"used": used, "opened": mine}


LAYOUTS = {
    "fan-out-dp1-dp2": (3, {"images": {"data_parallel_size": 1},
                            "language": {"data_parallel_size": 2, "rank_offset": 1}}),
    "fan-in-dp2-dp1-pp2": (4, {"images": {"data_parallel_size": 2},
                               "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                            "rank_offset": 2}}),
    "language-first-tp2": (3, {"language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1},
                               "images": {"data_parallel_size": 1, "rank_offset": 2}}),
    "encoder-pp2": (3, {"images": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1},  # stages 0 -> 1
                        "language": {"data_parallel_size": 1, "rank_offset": 2}}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_step_talks_only_over_pairs_opened_before_it(name):
    world, layout = LAYOUTS[name]
    results = run_distributed(_pairs_used_in_a_step, world, layout)
    assert any(r["used"] for r in results), "the layout must send point to point"
    for rank, r in enumerate(results):
        assert r["used"] == r["opened"], f"rank {rank}: used {sorted(r['used'])}, opened {sorted(r['opened'])}"
