"""The training step beyond parity: bf16 runs of the heterogeneous layouts, fp16 through the step, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mimo.config import LayoutError
from mimo.distributed import BLOCK_RECOMPILE_LIMIT, DistributedConfig, ModuleDistributedConfig
from mimo.testing import run_distributed
from mimo.training.grad_scaler import GlobalGradScaler
from mimo.training.optim import OptimizerConfig
from mimo.training.step import MimoTrainer
from tests.training.test_parity import IMG2_LANG_TP2, MATRIX, dataset, provider

TP2_TO_TP2PP2 = next(row[2] for row in MATRIX if row[0].startswith("8-"))


def low_precision_losses(rank: int, world_size: int, layout: dict, dtype: str, steps: int) -> list:
    """`steps` steps on one fixed batch with float32 parameters and `dtype` compute; the losses and skips."""
    prov = provider(layout, ("images",), params_dtype=torch.float32)
    model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("ddp", getattr(torch, dtype))))
    scaler = GlobalGradScaler(init_scale=2.0**10) if dtype == "float16" else None
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=8, num_microbatches=2,
                          optimizer=OptimizerConfig(lr=3e-3), activation_dtype=getattr(torch, dtype), scaler=scaler)
    batch = _batch32()
    return [(r.loss, r.skipped) for r in (trainer.train_step(batch) for _ in range(steps))]


def _batch32():
    return _batch(dataset(("images",)), 0)


def _batch(data, first: int):
    """The 8 samples from `first` with float32 images (samples 0, 8, 16 on: text lengths 96, 98, 90)."""
    batch = data.batch(range(first, first + 8))
    for mb in batch.modality_inputs.values():
        mb.items = mb.items.float()
    return batch


@pytest.mark.parametrize(("layout", "world"), [(IMG2_LANG_TP2, 4), (TP2_TO_TP2PP2, 6)], ids=["fan-in", "tp2-pp2"])
def test_bf16_loss_falls_over_20_steps(layout, world):
    results = run_distributed(low_precision_losses, world, layout, "bfloat16", 20, timeout_s=300)
    losses = [loss for loss, _ in results[0]]
    assert all(r == results[0] for r in results), "ranks disagree on the loss"
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    print(f"\nbf16: {losses[0]:.3f} -> {losses[-1]:.3f}")


def test_fp16_with_one_scaler_trains():
    results = run_distributed(low_precision_losses, 4, IMG2_LANG_TP2, "float16", 8, timeout_s=300)
    losses = [loss for loss, _ in results[0]]
    assert all(r == results[0] for r in results), "ranks disagree on the loss or on skipping"
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


def build_trainer_with(rank: int, world_size: int, global_batch: int, micro: int) -> str:
    prov = provider(IMG2_LANG_TP2, ("images",))
    model = prov.provide_distributed_model()
    try:
        MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=global_batch,
                    num_microbatches=micro)
    except LayoutError as e:
        return str(e)
    return "no error"


def wrong_batch_size(rank: int, world_size: int) -> str:
    prov = provider(IMG2_LANG_TP2, ("images",))
    trainer = MimoTrainer(prov.provide_distributed_model(), prov.build_infra(), hidden_size=64,
                          global_batch_size=8, num_microbatches=2, activation_dtype=torch.float64)
    try:
        trainer.train_step(dataset(("images",)).batch(range(4)))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    ("global_batch", "micro", "message"),
    [
        (6, 4, "global_batch_size 6 is not divisible by num_microbatches 4"),
        (6, 2, "module 'images': micro-batch size 3 (global batch 6 / 2 micro-batches) is not divisible by its "
               "data_parallel_size 2; use a global batch that is a multiple of 4"),
    ],
)
def test_bad_batch_shapes_fail_before_the_first_step(global_batch, micro, message):
    assert run_distributed(build_trainer_with, 4, global_batch, micro)[0] == message


def test_a_batch_of_the_wrong_size_is_refused():
    msg = run_distributed(wrong_batch_size, 4)[0]
    assert msg == "the batch has 4 samples, but the trainer was built for a global batch of 8"


def p2p_directions(rank: int, world_size: int) -> list[str]:
    """One step of layout #8 (bridge + pipeline) with dist.isend spied on: the group each send used."""
    import torch.distributed as dist

    prov = provider(TP2_TO_TP2PP2, ("images",))
    model = prov.provide_distributed_model()
    infra = prov.build_infra()
    trainer = MimoTrainer(model, infra, hidden_size=64, global_batch_size=8, num_microbatches=2,
                          activation_dtype=torch.float64)
    names = {id(infra.p2p_groups.forward): "forward", id(infra.p2p_groups.backward): "backward"}
    seen, real = [], dist.isend

    def spy(tensor, dst, group=None, tag=0):
        seen.append(names.get(id(group), "default"))
        return real(tensor, dst, group=group, tag=tag)

    dist.isend = spy
    try:
        trainer.train_step(dataset(("images",)).batch(range(8)))
    finally:
        dist.isend = real
    return seen


def test_point_to_point_traffic_uses_the_direction_groups():
    groups = [g for per_rank in run_distributed(p2p_directions, 6) for g in per_rank]
    assert groups and "default" not in groups, groups
    assert {"forward", "backward"} <= set(groups)


def compiled_variants(rank: int, world_size: int) -> dict:
    """float32 steps of the fan-in layout (language TP 2) in one world: eager, every transformer block compiled,
    and compiled and recomputed in the backward; each variant's losses, and dynamo's settings and the images' DDP
    after the compiled model was built. A length twice, then two new ones (96, 96, 98, 90); recomputed: 2 steps."""
    data, out = dataset(("images",)), {}
    for name, compile_blocks, recompute, firsts in [("eager", False, "none", (0, 0, 8, 16)),
                                                    ("compiled", True, "none", (0, 0, 8, 16)),
                                                    ("recomputed", True, "full", (0, 0))]:
        prov = provider(IMG2_LANG_TP2, ("images",), params_dtype=torch.float32)
        cfg = ModuleDistributedConfig("ddp", None, compile_blocks, recompute_granularity=recompute)
        model = prov.provide_distributed_model(DistributedConfig(cfg))
        trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=8, num_microbatches=2,
                              optimizer=OptimizerConfig(lr=3e-3))
        if name == "compiled":
            images = dict(model.modality_submodules).get("images")  # DDP: DP2 (ranks 0-1 host it)
            out["settings"] = {"recompile_limit": torch._dynamo.config.recompile_limit,
                               "optimize_ddp": torch._dynamo.config.optimize_ddp,
                               "bucket_views": getattr(images, "gradient_as_bucket_view", None)}
        out[name] = [trainer.train_step(_batch(data, first)).loss for first in firsts]
    return out


def test_compiled_blocks_train_like_eager():
    """Compiled blocks train like eager, recomputed or not. A new sequence length recompiles a TP block; as a
    dynamic-shape graph, torch's tracer recursed without end on the DTensor block (RecursionError at the first new
    length). TP blocks compile with static shapes."""
    run = run_distributed(compiled_variants, 4, timeout_s=600)[0]
    eager, settings = run["eager"], run["settings"]
    assert run["compiled"] == pytest.approx(eager, rel=1e-4), (run["compiled"], eager)  # float32, fused kernels
    # recomputation around compiled blocks, TP ones included (torch's compiled checkpoint fails on DTensors)
    assert run["recomputed"] == pytest.approx(eager[:2], rel=1e-4), (run["recomputed"], eager)
    # packed rows of many lengths must not send the blocks back to eager (benchmarks/DATA.md)
    assert settings["recompile_limit"] >= BLOCK_RECOMPILE_LIMIT
    # each block one graph (dynamo's DDP optimizer would split it at DDP's buckets), gradients in the buckets
    # (RESULTS.md, session 7: DDP's cost at one rank 39 -> 11 ms a step at 1b)
    assert settings["optimize_ddp"] is False and settings["bucket_views"] is True


def phase_order(rank: int, world_size: int, layout: dict) -> list[str]:
    """One float64 step in 2 micro-batches with the encoder's forward, the gradient reaching its output and
    the language forward recorded in order: when each micro-batch's encoder activations can be freed."""
    from mimo.distributed import unwrap

    prov = provider(layout, ("images",))
    model = prov.provide_distributed_model()
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=8, num_microbatches=2,
                          activation_dtype=torch.float64)
    events: list[str] = []

    def encoder_hook(module, args, out):
        events.append("encode")
        out.register_hook(lambda grad: events.append("encoder backward"))

    unwrap(model.modality_submodules["images"]).register_forward_hook(encoder_hook)
    unwrap(model.language_model).register_forward_hook(lambda *_: events.append("language"))
    trainer.train_step(dataset(("images",)).batch(range(8)))
    return events


def test_homogeneous_encodes_each_microbatch_just_before_its_language_forward():
    # as a plain loop: micro-batch 0's encoder activations are freed before micro-batch 1 is encoded
    homogeneous = next(row[2] for row in MATRIX if row[0].startswith("1-"))
    assert run_distributed(phase_order, 2, homogeneous)[0] == ["encode", "language", "encoder backward"] * 2


def test_colocated_encodes_every_microbatch_before_the_language_phase():
    # different layouts on one span: the bridge's collectives need every rank at the same micro-batch
    colocated = next(row[2] for row in MATRIX if row[0].startswith("3-"))
    order = run_distributed(phase_order, 4, colocated)[0]
    assert order == ["encode"] * 2 + ["language"] * 2 + ["encoder backward"] * 2, order


def summed_votes(rank: int, world_size: int) -> list[tuple[tuple[float, ...], int]]:
    """Two float64 steps on the heterogeneous 1+1 layout (a rank without the language model too), without and with
    votes (rank r votes (r, 1)); per step the summed votes and the world collectives the step issued."""
    from unittest import mock

    import torch.distributed as dist

    layout = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}
    prov = provider(layout, ("images",))
    trainer = MimoTrainer(prov.provide_distributed_model(), prov.build_infra(), hidden_size=64, global_batch_size=8,
                          num_microbatches=2, activation_dtype=torch.float64)
    batch, out = dataset(("images",)).batch(range(8)), []
    for votes in (None, lambda: (float(rank), 1.0)):
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as reduce:
            result = trainer.train_step(batch, votes)
        out.append((result.votes, reduce.call_count))
    return out


def test_votes_ride_on_the_steps_own_all_reduce():
    """`train.exit_*`'s votes (mimo.training.deadline) are summed over every rank with no collective of their own."""
    for (plain, plain_calls), (voted, voted_calls) in run_distributed(summed_votes, 2):
        assert plain == () and voted == (1.0, 2.0)
        assert voted_calls == plain_calls
