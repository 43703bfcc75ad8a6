"""`distributed.<module>.cache_weight_casts`: weight casts made once per step (`mimo.weight_casts`), exact.

Trained through `MimoTrainer` on 2 gloo ranks (the tiny LLaVA, DDP over DP2, bf16 autocast; the language model in
tensorwise fp8 with torchao's emulated matmuls, no CPU having float8 ones, but its head in bf16, as the images
module), 3 steps of 3 micro-batches, with the cache on and off, the language model eager and compiled (`aot_eager`,
as tests/test_fp8.py: inductor's CPU build takes ~30 s; the cache was checked bitwise with inductor on the CPU too,
by hand, float8 and bf16 layers inside compiled blocks), recomputed and not. torchao is imported only in the
workers."""

from __future__ import annotations

import functools
import importlib.util
import weakref
from unittest import mock

import pytest
import torch

from mimo.distributed import DistributedConfig, ModuleDistributedConfig, caches_float8_casts, caches_weight_casts
from mimo.testing import run_distributed
from mimo.training.run_config import parse_run_config
from mimo.weight_casts import drop, enable, fill
from tests.test_distributed_modules import DP2, IMAGE_ID, IMAGES, TOKENS, llava

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="the fp8 extra (pip install 'mimo[fp8]') is not installed")

STEPS, MICROBATCHES, BATCH = 3, 3, 6
VARIANTS = [(compiled, recompute) for compiled in (False, True) for recompute in ("none", "full")]


def _settings(cache: bool, compiled: bool, recompute: str) -> DistributedConfig:
    """bfloat16 compute, both modules compiled and recomputed alike; the language model in emulated tensorwise fp8,
    every layer converted but the head (bf16 under autocast, as the images module's layers)."""
    language = ModuleDistributedConfig("ddp", torch.bfloat16, compiled, recompute, fp8="tensorwise",
                                       fp8_small_layers="convert", fp8_emulate=True, cache_weight_casts=cache)
    images = ModuleDistributedConfig("ddp", torch.bfloat16, False, recompute, cache_weight_casts=cache)
    return DistributedConfig(images, {"language": language})


def _batch():
    """One batch for every step: a new length would compile anew, cache or not."""
    from mimo.data import ModalitySpec, SyntheticDataset

    data = SyntheticDataset(BATCH, {IMAGES: ModalitySpec.image(IMAGE_ID, TOKENS)}, seed=0, dtype=torch.float32)
    return data.batch(range(BATCH))


def _train(cache: bool, compiled: bool, recompute: str) -> dict:
    """STEPS steps; the losses, the language gradients each optimizer step saw, the final parameters, the weight
    casts torchao's matmuls made (all steps) and the cache's (per step), the compiled graphs after each step, and
    whether any cached cast outlived its step."""
    import torchao.float8.float8_linear as f8
    from torch._dynamo.utils import counters

    from mimo.training.optim import OptimizerConfig
    from mimo.training.step import MimoTrainer

    provider = llava(DP2, dtype=torch.float32)
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend="aot_eager")):
        model = provider.provide_distributed_model(_settings(cache, compiled, recompute))
    trainer = MimoTrainer(model, provider.build_infra(), hidden_size=64, global_batch_size=BATCH,
                          num_microbatches=MICROBATCHES, optimizer=OptimizerConfig(lr=3e-3),
                          activation_dtype=torch.bfloat16)
    from mimo.weight_casts import CachedCast, CachedCastLinear

    lm, images = model.language_model.module, model.modality_submodules[IMAGES].module
    params = [*lm.parameters(), *images.parameters()]
    grads, kept = [], []
    for opt in trainer.optimizers.values():  # each module's gradients as its optimizer steps
        opt.register_step_pre_hook(lambda o, *_: grads.append(
            [p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None]))
    trainer.optimizers["language"].register_step_pre_hook(  # the casts this step used, watched past its end
        lambda *_: kept.extend(weakref.ref(layer.weight_cast) for layer in trainer.cached_casts))
    scales = []  # float8 casts' scales: computed without gradient (only the cast's identity backward carries one)
    trainer.optimizers["language"].register_step_pre_hook(
        lambda *_: scales.extend(layer.weight_cast._scale.requires_grad for layer in float8))
    float8 = [m for m in trainer.cached_casts if not isinstance(m, CachedCastLinear)]
    weight_casts, graphs, losses = [], [], []
    real = f8.hp_tensor_to_float8_dynamic
    calls = mock.patch.object(f8, "hp_tensor_to_float8_dynamic", side_effect=real)
    cache_fills = mock.patch.object(type(float8[0]), "cast_weight", autospec=True,
                                    side_effect=type(float8[0]).cast_weight) if cache else None
    compiled_before = counters["stats"]["unique_graphs"]
    with calls as spy:
        for batch in [_batch()] * STEPS:
            if cache_fills is not None:
                with cache_fills as filled:
                    losses.append(trainer.train_step(batch).loss)
                weight_casts.append(filled.call_count)
            else:
                losses.append(trainer.train_step(batch).loss)
            graphs.append(counters["stats"]["unique_graphs"] - compiled_before)
    matmul_casts = sum(1 for c in spy.call_args_list if c.kwargs.get("gemm_input_role") == f8.GemmInputRole.WEIGHT)
    cached = {"float8": len(float8), "head": [n for n, m in lm.named_modules() if isinstance(m, CachedCastLinear)],
              "images": sum(isinstance(m, CachedCast) for m in images.modules())}
    return {"losses": losses, "grads": grads, "params": [p.detach().clone() for p in params],
            "cached": cached, "cached_layers": len(trainer.cached_casts), "matmul_weight_casts": matmul_casts,
            "float8_fills": weight_casts, "graphs": graphs,
            "left": [layer.weight_cast for layer in trainer.cached_casts if layer.weight_cast is not None],
            "alive": sum(ref() is not None for ref in kept), "watched": len(kept), "scales_grad": any(scales)}


def variants(rank: int, world_size: int) -> dict:
    """Each (compiled, recompute) variant trained with the cache off and on."""
    torch.set_autocast_dtype("cuda", torch.bfloat16)  # Float8Linear casts under autocast to CUDA's dtype
    return {(compiled, recompute): (_train(False, compiled, recompute), _train(True, compiled, recompute))
            for compiled, recompute in VARIANTS}


@pytest.fixture(scope="module")
def worlds() -> list[dict]:
    return run_distributed(variants, 2, timeout_s=300)


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@needs_torchao
@pytest.mark.parametrize(("compiled", "recompute"), VARIANTS)
def test_cached_casts_train_bitwise_like_uncached(worlds, compiled, recompute):
    for rank, world in enumerate(worlds):
        plain, cached = world[(compiled, recompute)]
        assert cached["losses"] == plain["losses"], (rank, cached["losses"], plain["losses"])
        assert len(cached["grads"]) == 2 * STEPS and all(_equal(c, p) for c, p in zip(cached["grads"], plain["grads"],
                                                                                   strict=True)), rank
        assert _equal(cached["params"], plain["params"]), rank
        assert cached["losses"][-1] < cached["losses"][0], cached["losses"]


@needs_torchao
@pytest.mark.parametrize(("compiled", "recompute"), VARIANTS)
def test_each_weight_is_cast_once_a_step_and_dropped_after_it(worlds, compiled, recompute):
    """14 converted layers: uncached, each cast in every micro-batch's forward and backward (and recomputed
    forward); cached, once a step, never by the matmuls; the head and the images module's linear layers cached
    in bf16; nothing cached outlives its step; compiled, a new step's cache compiles nothing new."""
    for world in worlds:
        plain, cached = world[(compiled, recompute)]
        assert cached["cached"]["float8"] == 14 and cached["cached"]["head"] == ["lm_head"]
        assert cached["cached"]["images"] > 0 and plain["cached_layers"] == 0
        layers = cached["cached_layers"]
        if not compiled:  # compiled, dynamo traces the casts once
            per_microbatch = 3 if recompute == "full" else 2
            assert plain["matmul_weight_casts"] == STEPS * MICROBATCHES * 14 * per_microbatch
            assert cached["matmul_weight_casts"] == 0
        assert cached["float8_fills"] == [14] * STEPS and not cached["scales_grad"]
        assert cached["left"] == [] and cached["watched"] == layers * STEPS and cached["alive"] == 0
        if compiled:  # the first step compiles (recomputed: around the blocks already compiled), later ones not
            assert cached["graphs"] == [cached["graphs"][0]] * STEPS, cached["graphs"]
            assert recompute == "full" or cached["graphs"][0] > 0


def test_casts_are_cached_when_asked_in_mixed_precision_on_whole_weights_float8_ones_tensorwise():
    tensorwise = ModuleDistributedConfig("ddp", torch.bfloat16, fp8="tensorwise", cache_weight_casts=True)
    assert caches_weight_casts(tensorwise, tp=1) and caches_float8_casts(tensorwise, tp=1)
    assert not caches_weight_casts(tensorwise, tp=2), "TP: DTensor weights"
    assert not caches_weight_casts(ModuleDistributedConfig("fsdp", torch.bfloat16, fp8="tensorwise",
                                                           cache_weight_casts=True), tp=1)
    rowwise = ModuleDistributedConfig("ddp", torch.bfloat16, fp8="rowwise", cache_weight_casts=True)
    assert caches_weight_casts(rowwise, tp=1) and not caches_float8_casts(rowwise, tp=1), "bf16 layers only"
    assert caches_weight_casts(ModuleDistributedConfig("ddp", torch.bfloat16, cache_weight_casts=True), tp=1)
    assert not caches_weight_casts(ModuleDistributedConfig("ddp", None, cache_weight_casts=True), tp=1), \
        "no autocast: nothing cast"
    default = ModuleDistributedConfig("ddp", torch.bfloat16, fp8="tensorwise")
    assert not caches_weight_casts(default, tp=1), "off unless asked (its memory)"


def test_a_cached_bf16_weight_serves_only_autocast_in_its_dtype():
    """Outside autocast (or in another dtype) a cached layer computes on its float32 weight, as without the cache;
    under autocast bitwise as autocast's own cast; aligned layers only (a misaligned one computes padded)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 12))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        expected = module[0](x)
    assert enable(module, torch.bfloat16) == ["0"], "12 is no multiple of 8: gemm_alignment's"
    layer = module[0]
    fill([layer])
    assert layer.weight_cast.dtype == torch.bfloat16 and not layer.weight_cast.requires_grad
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(layer(x), expected)
        for _ in range(2):  # two backwards through the one cast, each through its forward's own node
            layer(x).sum().backward()
        reference = torch.nn.Linear(16, 8)
        reference.load_state_dict(layer.state_dict())
        reference(x).sum().backward()
    assert torch.equal(layer.weight.grad, 2 * reference.weight.grad), "each backward's gradient, cast to float32"
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias), "no autocast: float32, as without the cache"
    with torch.autocast("cpu", torch.float16):
        assert layer(x).dtype == torch.float16
    drop([layer])
    assert layer.weight_cast is None


def _gradient_order(module: torch.nn.Sequential, x: torch.Tensor) -> list[tuple[str, int]]:
    """The order in which one backward accumulates each layer's weight gradient ("weight", i) and reaches each
    layer's input ("input", i: the hook runs as the backward enters the layer below)."""
    events: list[tuple[str, int]] = []
    for i, layer in enumerate(module):
        layer.weight.register_post_accumulate_grad_hook(lambda _p, i=i: events.append(("weight", i)))
    for i, layer in enumerate(module):
        x = x.requires_grad_() if i == 0 else x
        x.register_hook(lambda _g, i=i: events.append(("input", i)))
        x = layer(x)
    x.sum().backward()
    return events


def _assert_each_weight_gets_its_gradient_before_the_layer_below_runs(module: torch.nn.Sequential,
                                                                     x: torch.Tensor) -> None:
    """Each weight's gradient is accumulated as soon as its layer's backward made it, before the backward enters the
    layer below: not held until the backward's end, which would keep a second float32 gradient per weight alive
    (RESULTS "Session 17": a cast's node made once a step is older than every micro-batch's, and autograd runs the
    newest ready node first)."""
    fill(list(module))
    events = _gradient_order(module, x)
    for i in range(1, len(module)):
        assert events.index(("weight", i)) < events.index(("input", i)), events
    assert all(p.grad is not None for p in module.parameters())
    drop(list(module))


def test_a_cached_bf16_cast_hands_its_gradient_on_at_once():
    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(3)))
    assert enable(module, torch.bfloat16) == ["0", "1", "2"]
    with torch.autocast("cpu", torch.bfloat16):
        _assert_each_weight_gets_its_gradient_before_the_layer_below_runs(module, torch.randn(4, 16))


@needs_torchao
def test_a_cached_float8_cast_hands_its_gradient_on_at_once():
    """torchao's emulated tensorwise float8 (no CPU has float8 matmuls); float32, no autocast."""
    from mimo.fp8 import FP8Layers, convert

    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(3)))
    convert(module, FP8Layers("tensorwise", ["0", "1", "2"]), emulate=True)
    assert enable(module, torch.bfloat16) == ["0", "1", "2"]
    _assert_each_weight_gets_its_gradient_before_the_layer_below_runs(module, torch.randn(16, 16))


def test_the_setting_is_a_run_config_key():
    config = parse_run_config({"parallelism": {"language": {}}, "train": {"dtype": "bfloat16"},
                               "distributed": {"language": {"fp8": "tensorwise", "cache_weight_casts": True}}})
    settings = config.distributed_config
    assert settings.for_module("language").cache_weight_casts is True
    assert settings.for_module("images").cache_weight_casts is False  # off by default: it costs memory
