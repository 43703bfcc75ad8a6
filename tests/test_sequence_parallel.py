"""Sequence parallelism is applied, not just accepted: between blocks each TP rank holds its share of the tokens.

Parity (the same losses and parameters as one process) is in the parity matrices (`tests/training/test_parity.py`,
`test_packing_parity.py`: the `-sp` rows); it would hold just as well if the option did nothing, so this test
looks at the activations themselves during a real training step on 2 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard

from mimo.distributed import unwrap
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
    _record(seen["images"], unwrap(model.modality_submodules["images"]).encoder.encoder.layers[1])
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
