"""Sequence parallelism is applied, not just accepted: between blocks each TP rank holds its share of the tokens.

Parity (the same losses and parameters as one process) is in the parity matrices (`tests/training/test_parity.py`,
`test_packing_parity.py`: the `-sp` rows); it would hold just as well if the option did nothing, so these tests
look at the activations themselves during a real training step on 2 gloo ranks, and count the all-reduces that
sum the norms' partial gradients over TP under DDP (once a step, not per norm and micro-batch).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from mimo.ddp_shards import partial_over_replicate
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, unwrap
from mimo.testing import run_distributed
from mimo.training.step import MimoTrainer
from tests.training.test_parity import GLOBAL_BATCH, MICRO, OPTIM, batches, provider


def _record(seen: list, module: torch.nn.Module) -> None:
    """Record, at each call, (sharded along the sequence?, local tokens, global tokens) of the block's input."""
    def hook(_: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        sharded = isinstance(x, DTensor) and x.placements == (Shard(1),)
        seen.append((sharded, (x.to_local() if isinstance(x, DTensor) else x).shape[1], x.shape[1]))
    module.register_forward_pre_hook(hook)


def second_block_inputs(rank: int, world: int, sequence_parallel: bool) -> dict[str, list]:
    """One training step of the homogeneous TP2 layout; the inputs its second ViT and decoder blocks saw."""
    layout = {m: {"tensor_model_parallel_size": 2, "sequence_parallel": sequence_parallel}
              for m in ("images", "language")}
    prov = provider(layout, ("images",))
    model = prov.provide_distributed_model()
    seen: dict[str, list] = {"images": [], "language": []}
    _record(seen["images"], unwrap(model.modality_submodules["images"]).encoder.encoder.layers["1"])
    _record(seen["language"], unwrap(model.language_model).layers["1"])
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, activation_dtype=torch.float64)
    trainer.train_step(batches(("images",))[0])
    return seen


def test_sequence_parallel_shards_activations_between_blocks() -> None:
    """With SP each rank's block input is its torch.chunk share of the sequence (ViT: 17 tokens = 9 + 8)."""
    results = run_distributed(second_block_inputs, 2, True)
    for rank, seen in enumerate(results):
        for module, calls in seen.items():
            assert calls, f"rank {rank}: {module}'s second block never ran"
            for sharded, local, full in calls:
                share = torch.arange(full).chunk(2)[rank].numel()
                assert sharded and local == share, (f"rank {rank}: {module}'s second block got {local} of {full} "
                                                    f"tokens (sharded: {sharded}), expected {share}")
    assert (True, 9, 17) in results[0]["images"] and (True, 8, 17) in results[1]["images"]


def test_without_sequence_parallel_blocks_see_every_token() -> None:
    """The control: plain TP hands every rank the whole sequence, so the test above can tell the two apart."""
    for rank, seen in enumerate(run_distributed(second_block_inputs, 2, False)):
        for module, calls in seen.items():
            assert calls and all(not sharded and local == full for sharded, local, full in calls), (rank, module)


class _GradientAllReduces(TorchDispatchMode):
    """Counts the all-reduces of 1-D tensors (a norm's weight gradient, or a flat buffer of them; activations are
    [batch, sequence, hidden]) per process group, eager (`dist.all_reduce`) or functional (DTensor's)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor first turns itself into the collectives counted here
        if func._overloadpacket is torch.ops.c10d.allreduce_ and args[0][0].dim() == 1:
            self._count(dist.ProcessGroup.unbox(args[1]).group_name)
        elif func._overloadpacket is torch.ops._c10d_functional.all_reduce and args[0].dim() == 1:
            self._count(args[2])
        return func(*args, **(kwargs or {}))

    def _count(self, group: str) -> None:
        self.counts[group] = self.counts.get(group, 0) + 1


def tp_gradient_all_reduces(rank: int, world: int, microbatches: tuple[int, ...]) -> tuple[list[int], int]:
    """Homogeneous TP2×DP2 with SP under DDP: the TP group's gradient all-reduces in a step of each number of
    micro-batches, and how many TP groups the modules have."""
    layout = {m: {"tensor_model_parallel_size": 2, "sequence_parallel": True} for m in ("images", "language")}
    prov = provider(layout, ("images",))
    model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("ddp")))
    infra = prov.build_infra()
    tp = {grid.get_group("tp").group_name for grid in infra.module_to_grid_map.values()}
    counts = []
    for micro in microbatches:
        trainer = MimoTrainer(model, infra, hidden_size=64, global_batch_size=GLOBAL_BATCH, num_microbatches=micro,
                              optimizer=OPTIM, activation_dtype=torch.float64)
        with _GradientAllReduces() as spy:
            trainer.train_step(batches(("images",))[0])
        counts.append(sum(n for group, n in spy.counts.items() if group in tp))
    return counts, len(tp)


def test_ddp_sums_partial_norm_gradients_over_tp_once_per_step() -> None:
    """Under DDP a sequence-parallel norm's weight gradient (partial over TP) is all-reduced over TP once per step
    for all norms together, not once per norm and micro-batch (torch's `from_local` backward: 24 with 2 micro-batches,
    48 with 4); parity with one process is the `-sp` rows of tests/training/test_parity.py."""
    for rank, (counts, groups) in enumerate(run_distributed(tp_gradient_all_reduces, 4, (2, 4))):
        assert counts == [groups, groups], (f"rank {rank}: {counts} TP gradient all-reduces in a step of 2 and of 4 "
                                            f"micro-batches, expected {groups} (one per TP group) in each")


def test_only_a_partial_gradient_of_a_replicated_shard_stays_local() -> None:
    """A Partial gradient of a replicated parameter is left to the step's end; every other one goes to torch's
    `from_local` backward (a Shard or Replicate gradient, a Partial one of a sharded parameter)."""
    assert partial_over_replicate((Partial(),), (Replicate(),)) == (0,)
    assert partial_over_replicate((Replicate(), Partial()), (Replicate(), Replicate())) == (1,)
    assert partial_over_replicate((Partial("max"),), (Replicate(),)) == ()
    assert partial_over_replicate((Replicate(),), (Replicate(),)) == ()
    assert partial_over_replicate((Replicate(),), (Shard(0),)) == ()
    assert partial_over_replicate((Partial(),), (Shard(0),)) == ()
    assert partial_over_replicate((Partial(), Replicate()), (Replicate(), Shard(0))) == ()


class _PlainEncoder(torch.nn.Module):
    """A user's encoder whose TP plan knows nothing of sequence parallelism."""

    tokens_per_item = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def tp_plan(self) -> dict:
        return {}


def test_a_module_that_cannot_run_sequence_parallel_is_named():
    """Plain TP still asks `tp_plan()` without the argument; asking for SP names the module and the class."""
    from mimo.distributed import WrapError, tp_plan_of
    from mimo.models import MLPProjector, ModalitySubmodule

    submodule = ModalitySubmodule(_PlainEncoder(), MLPProjector(8, 8))
    assert set(tp_plan_of("images", submodule, False)) == {"projection.fc1", "projection.fc2"}
    with pytest.raises(WrapError, match=r"^module 'images': its encoder's _PlainEncoder.tp_plan takes no "
                                        r"sequence_parallel argument, so it cannot run sequence-parallel; set "
                                        r"sequence_parallel false$"):
        tp_plan_of("images", submodule, True)
    with pytest.raises(WrapError, match=r"^module 'audio': _PlainEncoder.tp_plan takes no sequence_parallel"):
        tp_plan_of("audio", _PlainEncoder(), True)
