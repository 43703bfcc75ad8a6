"""`tp_comm_overlap` (torch's asynchronous TP) is refused clearly wherever it cannot run: without sequence
parallelism, without compile, on ranks it would reach unasked, and without CUDA GPUs (its fused collectives use
symmetric memory: NCCL only). Whether it fuses and trains like plain TP: `tests/gpu/test_async_tp.py`."""

from __future__ import annotations

import warnings

import pytest

from mimo.config import LayoutError, MimoParallelismConfig
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError, check_distributed
from mimo.testing import run_distributed
from mimo.training.plan import plan_run
from mimo.training.run_config import RunConfigError, parse_run_config
from tests.training.test_parity import provider

SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
COMPILED = DistributedConfig(ModuleDistributedConfig(compile=True))


def refusal(modules: dict, settings: DistributedConfig = COMPILED, backend: str | None = None) -> str:
    """The one check's refusal of a layout on 2 ranks with `settings`, as a message."""
    layout = MimoParallelismConfig.from_dict(modules).finalize(2)
    with pytest.raises(WrapError) as e:
        check_distributed(settings, layout.module_names, layout, backend)
    return str(e.value)


@pytest.mark.parametrize(("modules", "message"), [
    ({"images": {}, "language": {"tensor_model_parallel_size": 2, "tp_comm_overlap": True}},
     "module 'language': tp_comm_overlap overlaps sequence parallelism's all-gathers and reduce-scatters with the "
     "matmuls, but sequence_parallel is false; set sequence_parallel true (with tensor_model_parallel_size > 1) or "
     "tp_comm_overlap false"),
    ({"images": SP, "language": {**SP, "tp_comm_overlap": True}},
     "modules 'language' and 'images' share ranks 0-1 and are sequence-parallel, but only 'language' sets "
     "tp_comm_overlap: it is one torch.compile switch for a whole process; set it on all of them or on none"),
])
def test_a_layout_it_cannot_serve_is_refused(modules, message):
    assert refusal(modules) == message


def test_a_value_that_is_not_a_bool_is_a_layout_error():
    with pytest.raises(LayoutError) as e:
        MimoParallelismConfig.from_dict({"images": {}, "language": {**SP, "tp_comm_overlap": "yes"}}).finalize(2)
    assert str(e.value) == "module 'language': tp_comm_overlap must be true or false, got 'yes'"


def test_it_needs_compile_on_its_module_and_nccl():
    layout = {"images": {}, "language": {**SP, "tp_comm_overlap": True}}
    off = DistributedConfig(ModuleDistributedConfig(compile=True), {"language": ModuleDistributedConfig()})
    assert refusal(layout, off) == ("module 'language': tp_comm_overlap is a torch.compile pass over the blocks, "
                                    "and compile is off; turn compile on or tp_comm_overlap off")
    assert refusal(layout, backend="gloo") == (
        "module 'language': tp_comm_overlap needs CUDA GPUs (NCCL and symmetric memory), but the process groups' "
        "backend is gloo; set tp_comm_overlap false")
    finalized = MimoParallelismConfig.from_dict(layout).finalize(2)
    check_distributed(COMPILED, finalized.module_names, finalized, "nccl")  # accepted


def test_a_layout_that_asks_it_everywhere_it_applies_is_described():
    c = MimoParallelismConfig.from_dict({"images": {"data_parallel_size": 2},  # no SP: nothing to overlap
                                         "language": {**SP, "tp_comm_overlap": True}}).finalize(2)
    assert c.get_parallelism("language").describe() == "TP2+SP+overlap x DP1 on ranks 0-1"


@pytest.mark.parametrize(("train", "message"), [
    ({}, "module 'language': tp_comm_overlap is a torch.compile pass over the blocks, and compile is off; turn "
         "compile on or tp_comm_overlap off"),
    ({"compile": True, "recompute_granularity": "full"}, None),
])
def test_a_run_without_compile_is_refused_before_any_worker(train, message):
    """`mimo validate` reaches the same check as the wrapper, without a backend (no process group yet)."""
    config = parse_run_config({"model": {"preset": "tiny"}, "train": train,
                               "parallelism": {"images": {}, "language": {**SP, "tp_comm_overlap": True}}})
    if message is None:
        plan_run(config, 2)
        return
    with pytest.raises(RunConfigError) as e:
        plan_run(config, 2)
    assert str(e.value) == message


def test_a_module_that_compiles_alone_may_ask_it():
    config = parse_run_config({"model": {"preset": "tiny"}, "distributed": {"language": {"compile": True}},
                               "parallelism": {"images": {}, "language": {**SP, "tp_comm_overlap": True}}})
    plan_run(config, 2)


def wrapped(rank: int, world_size: int, compile_: bool) -> str:
    """The wrapper's refusal of TP2+SP with the overlap on a gloo group (mocking a GPU is not possible)."""
    layout = {"images": {"data_parallel_size": 2}, "language": {**SP, "tp_comm_overlap": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = provider(layout, ("images",))
        try:
            prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("ddp", compile=compile_)))
        except WrapError as e:
            return str(e)
    return "wrapped"


@pytest.mark.parametrize(("compile_", "message"), [
    (True, "module 'language': tp_comm_overlap needs CUDA GPUs (NCCL and symmetric memory), but the process groups' "
           "backend is gloo; set tp_comm_overlap false"),
    (False, "module 'language': tp_comm_overlap is a torch.compile pass over the blocks, and compile is off; turn "
            "compile on or tp_comm_overlap off"),
])
def test_the_wrapper_refuses_it_without_compile_or_without_gpus(compile_, message):
    assert run_distributed(wrapped, 2, compile_) == [message, message]
