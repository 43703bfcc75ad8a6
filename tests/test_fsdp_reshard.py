"""FSDP2's reshard policy (`reshard_after_forward`): how often each block's parameters are gathered in a step.

"always" gathers a block for every micro-batch's forward and again for its backward; "never" gathers it once a
step and keeps it until the last micro-batch's backward; "default" keeps only the last block between its
forward and backward. Counted on real gloo groups by wrapping FSDP2's one all-gather function (torch-internal:
the only place every parameter group's all-gather goes through). Parity of the numbers: test_parity's
`*-fsdp-never` rows.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest

from mimo.config import MimoParallelismConfig
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError, holds_gathered, reshard_policy
from mimo.testing import run_distributed
from mimo.training.step import MimoTrainer
from tests.training.test_parity import GLOBAL_BATCH, OPTIM, batches, provider

MICRO = 4  # micro-batches a step: "always" gathers per micro-batch, "never" once


def gathers_in_a_step(rank: int, world_size: int, policy: str) -> tuple[int, int]:
    """(all-gathers in the second step, FSDP2 units) of DP2 FSDP2 with `policy` on both modules."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = MimoParallelismConfig.from_dict({"images": {}, "language": {}}).to_dict()
        prov = provider(layout, ("images",))
        wrap = ModuleDistributedConfig("fsdp", reshard_after_forward=policy)
        model = prov.provide_distributed_model(DistributedConfig(wrap))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM)
    first, second = batches(("images",))[:2]
    trainer.train_step(first)  # FSDP2's lazy init on the first step
    real, count = _fsdp_param_group.foreach_all_gather, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    with mock.patch.object(_fsdp_param_group, "foreach_all_gather", counted):
        trainer.train_step(second)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return count[0], units


def test_never_gathers_each_block_once_a_step_and_always_once_per_forward_and_backward():
    counts = {p: run_distributed(gathers_in_a_step, 2, p)[0] for p in ("always", "default", "never")}
    (never, units), (always, _), (default, _) = counts["never"], counts["always"], counts["default"]
    roots = 2  # the encoder and the language model: FSDP2 keeps a root gathered from its forward to its backward
    blocks = units - roots
    assert never == units, counts  # every unit once, whatever the micro-batch count
    assert always == roots * MICRO + blocks * 2 * MICRO, counts  # each block for each forward and backward
    last = 2  # each module's last block stays gathered from its forward to its backward
    assert default == roots * MICRO + last * MICRO + (blocks - last) * 2 * MICRO, counts


def test_a_pipeline_stage_never_reshards_by_default_and_the_last_block_is_kept():
    assert [reshard_policy("default", 1)(i, 3) for i in range(3)] == [True, True, False]
    assert [reshard_policy("default", 2)(i, 3) for i in range(3)] == [False, False, False]
    assert [reshard_policy("always", 2)(i, 3) for i in range(3)] == [True, True, True]
    assert [reshard_policy("never", 1)(i, 3) for i in range(3)] == [False, False, False]
    assert [holds_gathered(p, 1) for p in ("default", "always", "never")] == [False, False, True]
    assert [holds_gathered(p, 2) for p in ("default", "always", "never")] == [True, False, True]


@pytest.mark.parametrize(("cfg", "message"), [
    (ModuleDistributedConfig("fsdp", reshard_after_forward="sometimes"),
     "module 'language': reshard_after_forward must be 'default', 'always' or 'never', got 'sometimes'"),
    (ModuleDistributedConfig("ddp", reshard_after_forward="never"),
     "module 'language': reshard_after_forward 'never' applies to data_parallel 'fsdp' only, and it is 'ddp' "
     "(use 'fsdp', or leave reshard_after_forward 'default')"),
])
def test_a_policy_that_cannot_apply_is_refused(cfg, message):
    with pytest.raises(WrapError) as e:
        DistributedConfig(modules={"language": cfg}).check(["language"])
    assert str(e.value) == message
