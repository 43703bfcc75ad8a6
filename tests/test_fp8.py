"""`distributed.<module>.fp8`: which linear layers convert (the stated rule), the refusals, and the conversion in
`parallelize` with FSDP2 (float8 all-gather), DDP, TP (torchao's float8 styles), recomputation and checkpoints.

No CPU has float8 matmuls worth running, so the training cases here use torchao's emulation
(`ModuleDistributedConfig.fp8_emulate`: the same Float8Linear layers, casts, scales, TP styles and FSDP2 float8
all-gather, the matmuls in high precision on float8-rounded values); the GPU itself is mocked only where a
refusal needs a compute capability (`torch.cuda.get_device_capability`, said at each test). torchao is imported
only in the gloo worker processes (and in the refusal of its absence, mocked)."""

from __future__ import annotations

import functools
import importlib.util
import math
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from mimo import fp8
from mimo.config import RunConfigError
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError, module_fp8_layers, tp_plan_of
from mimo.models import Decoder, DecoderConfig
from mimo.testing import run_distributed
from mimo.training.run_config import parse_run_config
from tests.test_distributed import full_state
from tests.test_distributed_modules import IMAGES, dp_coord, fixed_batch, language_loss_sum, llava
from tests.test_train_cli import in_process

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="the fp8 extra (pip install 'mimo[fp8]') is not installed")

TP2, DP2 = {"tensor_model_parallel_size": 2}, {"data_parallel_size": 2}
STEPS, LR = 2, 3e-3


# -- the rule ------------------------------------------------------------------------------------------------
def test_rule_skips_small_gemms_the_head_and_odd_dims():
    assert fp8.too_small(4096, 1024, "tensorwise") and not fp8.too_small(4096, 1040, "tensorwise")
    assert not fp8.too_small(4112, 1024, "tensorwise")
    assert fp8.too_small(4096, 2048, "rowwise") and fp8.too_small(1024, 8192, "rowwise")
    assert fp8.too_small(2048, 4096, "rowwise") and not fp8.too_small(2064, 4096, "rowwise")
    assert fp8.skip_reason("layers.3.mlp.up_proj", 4096, 11008, "tensorwise", "skip") is None
    assert fp8.skip_reason("lm_head", 4096, 32064, "tensorwise", "convert") == "output head"
    assert "multiple of 16" in fp8.skip_reason("x.fc", 4096, 11000, "tensorwise", "convert")
    assert "too small" in fp8.skip_reason("x.fc", 64, 128, "tensorwise", "skip")
    assert fp8.skip_reason("x.fc", 64, 128, "tensorwise", "convert") is None


def test_layers_are_judged_on_the_matmul_a_tp_rank_runs():
    """A column-sharded layer's N and a row-sharded one's K are divided by TP: q_proj of width 48 runs N = 24 on a
    TP2 rank (not a multiple of 16), o_proj K = 24; at TP1 both convert."""
    with torch.device("meta"):
        decoder = Decoder(DecoderConfig.tiny(hidden_size=48, num_heads=3, num_kv_heads=3, ffn_hidden_size=96))
    cfg = ModuleDistributedConfig(compute_dtype=torch.bfloat16, fp8="tensorwise", fp8_small_layers="convert")
    whole = module_fp8_layers("language", decoder, cfg, tp=1, sequence_parallel=False)
    split = module_fp8_layers("language", decoder, cfg, tp=2, sequence_parallel=False)
    assert "layers.0.self_attn.q_proj" in whole.converted and "layers.0.self_attn.o_proj" in whole.converted
    assert split.kept["layers.0.self_attn.q_proj"] == split.kept["layers.0.self_attn.o_proj"] == \
        "K or N not a multiple of 16"
    assert "layers.0.mlp.up_proj" in split.converted  # 96 / 2 = 48
    assert whole.kept == {"lm_head": "output head"}


def test_the_preset_shapes_convert_every_projection_but_the_head():
    """LLaVA-1.5-7B's language model (4096 / 11008) and the 1b preset (2048 / 5504) under tensorwise: all seven
    projections of every layer convert, the head stays; rowwise keeps the 1b's N = 2048 layers."""
    for preset, layers in (("7b", 32), ("1b", 24)):
        with torch.device("meta"):
            decoder = Decoder(DecoderConfig.preset(preset))
        cfg = ModuleDistributedConfig(compute_dtype=torch.bfloat16, fp8="tensorwise")
        chosen = module_fp8_layers("language", decoder, cfg, tp=1, sequence_parallel=False)
        assert len(chosen.converted) == 7 * layers and chosen.kept == {"lm_head": "output head"}, preset
    rowwise = module_fp8_layers("language", decoder, ModuleDistributedConfig(
        compute_dtype=torch.bfloat16, fp8="rowwise"), tp=1, sequence_parallel=False)
    assert sorted({n.split(".")[-1] for n in rowwise.converted}) == ["gate_proj", "up_proj"]


def test_the_line_names_converted_and_kept_layers_once_per_pattern():
    layers = fp8.FP8Layers("tensorwise", [f"layers.{i}.mlp.up_proj" for i in range(3)],
                           {"lm_head": "output head", "layers.0.self_attn.k_proj": "K·N too small to gain"})
    assert fp8.summary("language", layers) == (
        "fp8 language tensorwise: converted 3 linear layers: layers.*.mlp.up_proj ×3; kept in the compute dtype: "
        "lm_head (output head); layers.*.self_attn.k_proj (K·N too small to gain)")


# -- refusals, one line each -----------------------------------------------------------------------------------
def _run_config(**distributed) -> dict:
    return {"model": {"preset": "tiny"}, "parallelism": {IMAGES: {"data_parallel_size": 1},
                                                          "language": {"data_parallel_size": 1}},
            "distributed": {"language": distributed}, "train": {"steps": 1, "global_batch_size": 2,
                                                                 "dtype": "bfloat16"},
            "data": {"name": "synthetic", "num_samples": 4}}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fp8_is_refused_without_mixed_precision(dtype):
    config = _run_config(fp8="tensorwise")
    config["train"]["dtype"] = dtype
    with pytest.raises(RunConfigError) as e:
        parse_run_config(config)
    assert str(e.value).startswith("distributed.language: fp8 'tensorwise' needs mixed precision")
    assert "set train.dtype: bfloat16, or fp8: none" in str(e.value) and "\n" not in str(e.value)


def test_fp8_without_torchao_names_the_extra(tmp_path):
    """Refused by `mimo validate` (`plan_run`, as `mimo train`'s parent), torchao's absence mocked; a config that
    asks for fp8 still parses without it (`export-hf` and `generate` read a run's carried config)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(fp8="rowwise")))
    real = fp8.importlib.util.find_spec
    with mock.patch.object(fp8.importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name)):
        parse_run_config(_run_config(fp8="rowwise"))
        done = in_process("validate", str(path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "distributed.language: fp8 'rowwise' needs torchao, which is not installed: pip install 'mimo[fp8]'" \
        in done.stderr


def test_an_unknown_recipe_is_one_line():
    with pytest.raises(RunConfigError, match=r"distributed.language.fp8: .*'tensorwise'"):
        parse_run_config(_run_config(fp8="delayed"))


@needs_torchao
def test_fp8_on_a_machine_without_a_gpu_is_refused_before_any_worker(tmp_path):
    """`mimo validate` (`plan_run`, as `mimo train`'s parent) refuses in one line, CUDA's availability mocked off
    (true on this machine anyway); mocked on, it prints the line of converted layers that `mimo train` prints."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(fp8="tensorwise", fp8_small_layers="convert", cache_weight_casts=True)))
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        done = in_process("validate", str(path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "needs a CUDA GPU with float8 matmuls" in done.stderr and "this machine has none" in done.stderr
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        done = in_process("validate", str(path))
    assert done.stdout.splitlines()[0] == (
        "fp8 language tensorwise: converted 14 linear layers: layers.*.self_attn.q_proj ×2, "
        "layers.*.self_attn.k_proj ×2, layers.*.self_attn.v_proj ×2, layers.*.self_attn.o_proj ×2, "
        "layers.*.mlp.gate_proj ×2, layers.*.mlp.up_proj ×2, layers.*.mlp.down_proj ×2; kept in the compute dtype: "
        "lm_head (output head); weights cast to float8 once a step; compile is off: the float8 casts run unfused "
        "(torchao is fast only compiled)"), \
        done.stdout


def test_a_gpu_without_float8_is_refused():
    """The capability query is mocked (no GPU here): 8.0 (an A100) is refused, 9.0 passes."""
    cuda = torch.device("cuda", 0)
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0)), \
            mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA A100-SXM4-80GB"), \
            pytest.raises(fp8.FP8Error) as e:
        fp8.check_device("module 'language'", "tensorwise", cuda)
    assert "NVIDIA A100-SXM4-80GB has 8.0" in str(e.value)
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        fp8.check_device("module 'language'", "tensorwise", cuda)
    with pytest.raises(fp8.FP8Error, match="this rank computes on cpu"):
        fp8.check_device("module 'language'", "rowwise", torch.device("cpu"))


def test_a_module_whose_token_count_is_not_laid_out_pads_its_float8_matmuls():
    """The language model's rows are laid out to a multiple of 16 tokens (`text_layout`); an encoder's token count
    is its inputs' (577 patches an image for CLIP-336), and its float8 matmuls pad their inner dims to 16 (torchao's
    `pad_inner_dim`): at 577 tokens (emulated) the padded layer computes what the unpadded one does."""
    from mimo.distributed import aligned_tokens

    grid = types.SimpleNamespace(size={"cp": 1}.get)
    assert aligned_tokens("language", grid) and not aligned_tokens("images", grid)
    assert not aligned_tokens("language", types.SimpleNamespace(size={"cp": 2}.get))  # CP's chunks: any length
    outputs, grads = [], []
    for pad in (False, True):
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(32, 48))
        fp8.convert(layer, fp8.FP8Layers("tensorwise", ["0"]), emulate=True, pad_tokens=pad)
        assert layer[0].config.pad_inner_dim is pad
        x = torch.randn(577, 32, requires_grad=True)
        out = layer(x)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (x, layer[0].weight)))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for padded, plain in zip(*grads, strict=True):
        torch.testing.assert_close(padded, plain, rtol=0, atol=0)


# -- in parallelize (2 gloo ranks, emulated float8 matmuls) ---------------------------------------------------
def _settings(kind: str, recipe: str, **language) -> DistributedConfig:
    """Both modules computing in bfloat16 with `kind`; only the language model in fp8 (emulated)."""
    images = ModuleDistributedConfig(kind, torch.bfloat16)
    return DistributedConfig(images, {"language": ModuleDistributedConfig(
        kind, torch.bfloat16, fp8=recipe, fp8_small_layers="convert", fp8_emulate=True, **language)})


def _train(model, provider, steps: int = STEPS, optimizers: dict | None = None) -> list[float]:
    """`steps` AdamW steps (`optimizers`, else one torch AdamW) on one fixed batch; the global losses."""
    d, dp = dp_coord(provider)
    batch = fixed_batch(torch.float32)
    mine, tokens = batch.shard(d, dp), batch.num_label_tokens(model.special_token_ids)
    opts = list((optimizers or {"all": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                         lr=LR)}).values())
    losses = []
    for _ in range(steps):
        loss_sum = language_loss_sum(model, mine)
        (loss_sum / tokens).backward()
        total = loss_sum.detach().float()
        dist.all_reduce(total)
        losses.append(float(total) / tokens)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return losses


def _float8_linears(module: nn.Module) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return sorted(n for n, m in module.named_modules() if isinstance(m, Float8Linear))


def _trainer(model) -> types.SimpleNamespace:
    """What `Checkpointer` needs of a trainer: the model and the run's optimizers (fused AdamW per module)."""
    from mimo.training.optim import OptimizerConfig, build_optimizers

    optimizers = build_optimizers(model, OptimizerConfig(lr=LR, total_steps=STEPS))
    return types.SimpleNamespace(model=model, optimizers=optimizers, schedulers={}, step_count=0)


def _language_state(trainer) -> dict[str, torch.Tensor]:
    """The language model's parameters and AdamW moments, whole, by checkpoint key."""
    from mimo.ddp_shards import full_tensor
    from mimo.training.checkpoint_state import parameters

    opt, out = trainer.optimizers["language"], {}
    for module, key, p, _ in parameters(trainer.model):
        if module == "language":
            out[key] = full_tensor(p.detach(), p).clone()
            out.update({f"{key}.{name}": full_tensor(v, p).clone() for name, v in opt.state.get(p, {}).items()
                        if v.dim()})
    return out


def fsdp_and_checkpoints(rank: int, world_size: int, root: str) -> dict:
    """FSDP2 DP2, tensorwise with float8 all-gather, recomputation: trains with the run's fused AdamW; its checkpoint
    loads exactly (weights and moments) into the same model built without fp8, whose checkpoint loads exactly back
    into one with fp8 (float32 either way); on the CPU, fp8 not emulated is refused when the model is wrapped."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from mimo.training.checkpoint import Checkpointer, open_checkpoint

    torch.set_autocast_dtype("cuda", torch.bfloat16)  # Float8Linear casts under autocast to CUDA's dtype
    provider = llava(DP2, dtype=torch.float32)
    model = provider.provide_distributed_model(_settings("fsdp", "tensorwise", recompute_granularity="full"))
    weight = model.language_model.layers["0"].self_attn.q_proj.weight
    initial = full_state(model.language_model, grads=False)
    trainer = _trainer(model)
    out = {"float8": _float8_linears(model.language_model), "images": _float8_linears(model.modality_submodules),
           "all_gather_in_float8": isinstance(weight.to_local(), WeightWithDynamicFloat8CastTensor),
           "losses": _train(model, provider, optimizers=trainer.optimizers)}
    trained = _language_state(trainer)
    out["trained_all"] = all(not torch.equal(v, trained[f"language_model.{k}"]) for k, v in initial.items()
                             if k.endswith("proj.weight"))
    checkpoints = Checkpointer(Path(root) / "checkpoints")
    path = checkpoints.save(1, trainer, {})
    saved = open_checkpoint(path)[0].state_dict_metadata
    out["saved"] = sorted({str(m.properties.dtype) for k, m in saved.items() if "language_model." in k})
    out["moments"] = sum(1 for k in trained if k.endswith("exp_avg_sq"))
    for step, recipe in ((2, "none"), (3, "tensorwise")):  # fp8 on -> off -> on, each a fresh model (initial values)
        fresh = _trainer(provider.provide_distributed_model(_settings("fsdp", recipe)))
        checkpoints.load(path, fresh)
        loaded = _language_state(fresh)
        out[f"loaded_{recipe}"] = loaded.keys() == trained.keys() and \
            all(torch.equal(loaded[k], trained[k]) for k in trained)
        path = checkpoints.save(step, fresh, {})
    refused = _settings("ddp", "tensorwise")
    refused.modules["language"].fp8_emulate = False
    try:
        provider.provide_distributed_model(refused)
        out["refused"] = None
    except WrapError as e:
        out["refused"] = str(e)
    return out


def tp_and_ddp(rank: int, world_size: int) -> dict:
    """TP2 tensorwise: torchao's float8 TP styles on the converted layers (sequence-parallel too, in the plan:
    gloo cannot all-gather float8, NCCL does); DDP over DP2 with rowwise and compiled blocks (torchao #1308 broke
    under DDP + compile through dynamo's DDP optimizer, which mimo turns off). Both train. The blocks compile with
    `aot_eager` (torch.compile patched in this worker): inductor's CPU build would take minutes, and torchao's
    emulation is not meant for inductor; the GPU test compiles with inductor."""
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    torch.set_autocast_dtype("cuda", torch.bfloat16)
    out = {}
    provider = llava(TP2, dtype=torch.float32)
    model = provider.provide_distributed_model(_settings("ddp", "tensorwise"))
    out["tp_float8"] = _float8_linears(model.language_model)
    out["tp_losses"] = _train(model, provider)
    from torch._dynamo.utils import counters

    provider = llava(DP2, dtype=torch.float32)
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend="aot_eager")):
        model = provider.provide_distributed_model(_settings("ddp", "rowwise", compile=True))
    out["ddp_wrapped"] = type(model.language_model).__name__
    out["ddp_losses"] = _train(model, provider)
    out["graphs"] = counters["stats"]["unique_graphs"]

    with torch.device("meta"):
        decoder = Decoder(DecoderConfig.tiny())
    cfg = ModuleDistributedConfig(compute_dtype=torch.bfloat16, fp8="tensorwise", fp8_small_layers="convert")
    layers = module_fp8_layers("language", decoder, cfg, tp=2, sequence_parallel=True)
    fp8.convert(decoder, layers, emulate=True)
    plan = fp8.float8_tp_plan(tp_plan_of("language", decoder, sequence_parallel=True), decoder, layers)
    kinds = {Float8ColwiseParallel: "f8col", Float8RowwiseParallel: "f8row", PrepareFloat8ModuleInput: "f8in"}
    out["sp_plan"] = {k: kinds.get(type(v), type(v).__name__) for k, v in plan.items() if k.startswith("layers.0")}
    out["head_style"] = type(plan["lm_head"]).__name__
    return out


def both(rank: int, world_size: int, root: str) -> tuple[dict, dict]:
    """One world for both (torchao imported once): `fsdp_and_checkpoints`, then `tp_and_ddp`."""
    return fsdp_and_checkpoints(rank, world_size, root), tp_and_ddp(rank, world_size)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> list[tuple[dict, dict]]:
    return run_distributed(both, 2, str(tmp_path_factory.mktemp("fp8")))


@needs_torchao
def test_fsdp_float8_all_gather_recompute_and_checkpoints_without_fp8(worlds):
    for rank, r in enumerate(w[0] for w in worlds):
        assert r["float8"] == [f"layers.{i}.{p}" for i in range(2) for p in (
            "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
            "self_attn.q_proj", "self_attn.v_proj")], rank
        assert r["images"] == [], "the vision tower and projector stay in bf16 unless asked"
        assert r["all_gather_in_float8"], "tensorwise under FSDP2 all-gathers the weights in float8"
        assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][-1] < r["losses"][0], r["losses"]
        assert r["trained_all"], "every converted weight moved from its initial value (so a load has work to do)"
        assert r["saved"] == ["torch.float32"], "the checkpoint holds float32 master weights and AdamW moments"
        assert r["moments"] == 21, "every language parameter's AdamW moments are compared (21 parameters)"
        assert r["loaded_none"] and r["loaded_tensorwise"], "the fp8 checkpoint loads exactly with fp8 off and back"
        assert r["refused"].startswith("module 'language': fp8 'tensorwise' needs a CUDA GPU"), r["refused"]


@needs_torchao
def test_tensor_parallel_float8_styles_and_ddp(worlds):
    r = worlds[0][1]
    assert len(r["tp_float8"]) == 14 and r["ddp_wrapped"] == "DistributedDataParallel"
    assert r["graphs"] >= 1, "the DDP model's blocks ran compiled"
    for kind in ("tp_losses", "ddp_losses"):
        assert all(math.isfinite(x) for x in r[kind]) and r[kind][-1] < r[kind][0], (kind, r[kind])
    plan = r["sp_plan"]
    assert plan["layers.0.self_attn.q_proj"] == plan["layers.0.mlp.up_proj"] == "f8col"
    assert plan["layers.0.self_attn.o_proj"] == plan["layers.0.mlp.down_proj"] == "f8row"
    assert plan["layers.0.self_attn"] == plan["layers.0.mlp"] == "f8in", "the sublayers all-gather in float8"
    assert plan["layers.0"] == "PrepareModuleInput", "a block's input (its norm's) is never cast"
    assert plan["layers.0.input_layernorm"] == "SequenceParallel" and r["head_style"] == "ColwiseParallel"
