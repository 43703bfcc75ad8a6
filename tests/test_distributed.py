"""Per-module wrapping (TP, DDP, FSDP2) gives the single-process gradients: language model alone, float64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mimo.config import MimoParallelismConfig
from mimo.ddp_shards import full_tensor
from mimo.distributed import (
    DistributedConfig,
    ModuleDistributedConfig,
    WrapError,
    no_sync_forward,
    prepare_backward,
    unwrap,
)
from mimo.models import Decoder, DecoderConfig
from mimo.provider import MimoModelProvider, ModuleSpec
from mimo.testing import assert_matches_reference, run_distributed

DECODER = DecoderConfig.tiny(num_layers=2, num_kv_heads=4)  # 4 heads, 4 KV heads: TP up to 4
GLOBAL_BATCH, SEQ, MICRO = 8, 12, 2
STEPS, LR = 3, 1e-2


def lm_provider(layout: dict | None, **kwargs) -> MimoModelProvider:
    """A language-model-only provider (text-only batches)."""
    config = None if layout is None else MimoParallelismConfig.from_dict({"language": layout})
    return MimoModelProvider(ModuleSpec(Decoder, {"config": DECODER}), {}, {}, config,
                             params_dtype=torch.float64, seed=11, **kwargs)


def text_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and next-token labels with very uneven label counts per sample (sample i keeps about i+1 labels)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, DECODER.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.roll(-1, 1)
    keep = torch.arange(SEQ)[None, :] >= SEQ - 1 - torch.arange(GLOBAL_BATCH)[:, None]
    labels = labels.masked_fill(~keep, -100)
    labels[:, -1] = -100
    return ids, labels


def train(model_lm, dp_rank: int, dp_size: int, dp_group, on_first_step=None) -> list[float]:
    """STEPS of AdamW with MICRO micro-batches; loss = per-token mean over the global batch."""
    opt = torch.optim.AdamW([p for p in model_lm.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        ids, labels = text_batch(step)
        global_tokens = int((labels != -100).sum())
        micro = GLOBAL_BATCH // MICRO
        local_sum = torch.zeros((), dtype=torch.float64)
        for m in range(MICRO):
            mb = slice(m * micro, (m + 1) * micro)
            b = micro // dp_size
            mine = slice(mb.start + dp_rank * b, mb.start + (dp_rank + 1) * b)
            with no_sync_forward(model_lm):
                loss_sum, _ = model_lm(input_ids=ids[mine], labels=labels[mine])
            prepare_backward(model_lm, last=(m == MICRO - 1))
            (loss_sum / global_tokens).backward()
            local_sum += loss_sum.detach()
        if dp_group is not None:
            dist.all_reduce(local_sum, group=dp_group)
        losses.append(float(local_sum) / global_tokens)
        if step == 0 and on_first_step is not None:
            on_first_step()
        opt.step()
        opt.zero_grad()
    return losses


def full_state(module, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as a full tensor, by name without wrapper prefixes."""
    return {name: full_tensor(p.grad if grads else p.detach(), p).clone()
            for name, p in unwrap(module).named_parameters()}


def reference() -> tuple[list[float], dict, dict]:
    """The single-process run: losses, first-step gradients, final parameters."""
    lm = lm_provider(None).provide().language_model
    grads = {}
    losses = train(lm, 0, 1, None, on_first_step=lambda: grads.update(full_state(lm, grads=True)))
    return losses, grads, full_state(lm, grads=False)


def run_layout(rank: int, world_size: int, layout: dict, dp_kind: str) -> dict:
    """Train the wrapped language model on this rank's shard; return losses, grads and final params."""
    provider = lm_provider(layout)
    model = provider.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(dp_kind)))
    grid = provider.build_infra().module_to_grid_map["language"]
    lm = model.language_model
    grads = {}
    losses = train(lm, grid.coord.dp, grid.size("dp"), grid.get_group("dp"),
                   on_first_step=lambda: grads.update(full_state(lm, grads=True)))
    return {"losses": losses, "grads": grads, "params": full_state(lm, grads=False)}


LAYOUTS = [
    ("dp2-ddp", {"data_parallel_size": 2}, "ddp", 2),
    ("dp2-fsdp", {"data_parallel_size": 2}, "fsdp", 2),
    ("tp2", {"tensor_model_parallel_size": 2}, "ddp", 2),
    ("tp4", {"tensor_model_parallel_size": 4}, "ddp", 4),  # 4 KV heads (see DECODER)
    ("tp2-dp2-ddp", {"tensor_model_parallel_size": 2, "data_parallel_size": 2}, "ddp", 4),
    ("tp2-dp2-fsdp", {"tensor_model_parallel_size": 2, "data_parallel_size": 2}, "fsdp", 4),
]


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.mark.parametrize(("name", "layout", "dp_kind", "world"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_language_model_parity(ref, name, layout, dp_kind, world):
    ref_losses, ref_grads, ref_params = ref
    results = run_distributed(run_layout, world, layout, dp_kind)
    worst = 0.0
    for rank, res in enumerate(results):
        losses = {f"loss {s}": torch.tensor(got) for s, got in enumerate(res["losses"])}
        worst = max(worst, assert_matches_reference(
            losses, {f"loss {s}": torch.tensor(want) for s, want in enumerate(ref_losses)}, f"rank {rank}"))
        assert sorted(res["grads"]) == sorted(ref_grads) and len(res["losses"]) == len(ref_losses)
        worst = max(worst, assert_matches_reference(res["grads"], ref_grads, f"rank {rank} grad"))
        worst = max(worst, assert_matches_reference(res["params"], ref_params, f"rank {rank} param"))
    print(f"\n{name}: largest relative difference {worst:.1e}")


def test_config_errors():
    with pytest.raises(WrapError, match=r"distributed: unknown module\(s\) \['vision'\]; modules are \['language'\]"):
        DistributedConfig(modules={"vision": ModuleDistributedConfig()}).check(["language"])
    with pytest.raises(WrapError, match=r"module 'language': data_parallel must be 'ddp' or 'fsdp', got 'zero3'"):
        DistributedConfig(modules={"language": ModuleDistributedConfig("zero3")}).check(["language"])
    with pytest.raises(WrapError, match=r"module 'default': compute_dtype must be one of \[torch.float32, "
                       r"torch.bfloat16, torch.float16, torch.float64\] or None, got 'bfloat16'"):
        DistributedConfig(ModuleDistributedConfig(compute_dtype="bfloat16")).check(["language"])  # a name: no


def tp4_with_two_kv_heads(rank: int, world_size: int) -> str:
    provider = MimoModelProvider(ModuleSpec(Decoder, {"config": DecoderConfig.tiny()}), {}, {},
                                 MimoParallelismConfig.from_dict({"language": {"tensor_model_parallel_size": 4}}))
    try:
        provider.provide_distributed_model()
    except WrapError as e:
        return str(e)
    return "no error"


def test_tp_that_does_not_divide_heads_is_rejected():
    msg = run_distributed(tp4_with_two_kv_heads, 4)[0]
    assert msg == ("module 'language': layers.0.self_attn.k_proj holds 2 attention heads, not divisible by "
                   "tensor_model_parallel_size 4; choose a TP size that divides 2")


def fsdp_view_warnings(rank: int, world_size: int) -> list[str]:
    """FSDP2's warnings about views a wrapped module returned, over 3 steps of homogeneous DP2 (images+language)."""
    import warnings

    from mimo.distributed import DistributedConfig, ModuleDistributedConfig
    from mimo.training.step import MimoTrainer
    from tests.training.test_parity import batches, provider

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prov = provider({"images": {}, "language": {}}, ("images",))
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("fsdp")))
        trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=8, num_microbatches=2,
                              activation_dtype=torch.float64)
        for batch in batches(("images",)):
            trainer.train_step(batch)
    return [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]


def test_fsdp_modules_return_no_views():
    """The projector's Linear on 3-d rows returns a view, which FSDP2 warns about on every rank (an in-place op
    on it would skip the pre-backward hook); the wrapped module hands out a tensor of its own instead."""
    assert run_distributed(fsdp_view_warnings, 2) == [[], []]


def parallelize_steps(rank: int, world_size: int) -> list[str]:
    """The steps `parallelize` takes on homogeneous images + TP2+SP language with every setting on, in the order
    taken (each recorded and run, but the overlap: gloo has no symmetric memory)."""
    from unittest import mock

    import mimo.distributed as md
    from tests.training.test_parity import provider

    steps: list[str] = []

    def record(step: str, real=None):
        def run(*args, **kwargs):
            steps.append(step)
            return None if real is None else real(*args, **kwargs)
        return run

    prov = provider({"images": {}, "language": {"tensor_model_parallel_size": 2, "sequence_parallel": True,
                                                "tp_comm_overlap": True}}, ("images",))
    settings = DistributedConfig(ModuleDistributedConfig(compile=True, recompute_granularity="full"))
    with mock.patch.multiple(md, apply_fp8=record("fp8", md.apply_fp8),
                             apply_tensor_parallel=record("tp", md.apply_tensor_parallel),
                             overlap_tp_comms=record("async tp"), compile_blocks=record("compile", md.compile_blocks),
                             recompute=record("recompute", md.recompute),
                             apply_data_parallel=record("data parallel", md.apply_data_parallel)):
        model = md.parallelize(prov.build_meta_model(), prov.build_infra(), settings,
                               materialize=record("materialize", prov._materialize))
    assert isinstance(model.modality_submodules["images"], torch.nn.parallel.DistributedDataParallel)  # DP 2
    return steps


def test_parallelize_applies_tp_then_async_tp_compile_recompute_and_data_parallel_in_order():
    """FP8 conversion and TP on the meta model, materialization, then per module (images, then language, which
    asks the overlap): asynchronous TP, compile, recomputation, data parallelism: torchtitan's order, visible in
    one function."""
    per_module = ["compile", "recompute", "data parallel"]
    want = ["fp8", "tp", "materialize", *per_module, "async tp", *per_module]
    assert run_distributed(parallelize_steps, 2) == [want, want]
