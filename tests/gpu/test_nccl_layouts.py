"""Every layout that fits on two GPUs trains correctly under NCCL (two CUDA devices; skipped without them).

The models: the parity suite's tiny ViT into a decoder (`LAYOUTS`), and the tiny Qwen2.5-VL and Qwen3-VL of
tests/training/test_qwen_parity.py, packed images of four sizes (`QWEN_LAYOUTS`). Each layout runs in one pair
of NCCL processes (one GPU each), three checks in turn:
1. **float32 parity**, TF32 off (matmuls and cuDNN convolutions), 3 AdamW steps with global-norm clipping,
   against the same 3 steps in one process on one GPU. To `RTOL` = 1e-5 relative: every step's loss and
   gradient norm, and the first step's clipped gradients (each tensor whole, relative 2-norm of the
   difference), computed from identical parameters. To `PARAM_RTOL` = 1e-4: the later steps' gradients and
   the final parameters. Why 1e-5 holds and is tight: the runs differ only in the order of float32 sums (a TP
   split of a contraction, a DP all-reduce of two halves, micro-batches summed in another order); each such
   sum is off by a few ulps (6e-8 relative), and gradients, sums of many cancelling terms, agree to about
   1e-6 (measured: tests/gpu/README.md). Why what follows an optimizer step gets 1e-4: AdamW divides each
   gradient element by its running RMS plus eps (1e-8), so where an element's gradient is within a few eps of
   zero its update moves by up to lr·δ/eps for a gradient error δ; the rounding differences that first-step
   gradients show at 1e-6 come out of the optimizer up to a hundred times larger in a few elements, and the
   next gradients are taken at those parameters (measured: up to 5e-5 by step 3 under TP). 1e-4 still catches
   any wrong update: a missed or doubled gradient moves a tensor by ~1e-1.
   The exception is named: the ViT's attention key biases get an exactly zero gradient in exact arithmetic
   (softmax ignores a shift shared by all keys), so in float32 they hold rounding noise that AdamW scales up
   to ±lr; they are checked by the float64 CPU parity suite instead (tests/training/test_parity.py, to 1e-8).
   The second named exception is the Qwen-VL models (`ADAM_NOISE`): float32 rounding alone moves their later
   steps several times further than the ViT's (measured on CPU, not derived: the same few-element AdamW
   amplification, e.g. one element of Qwen2.5-VL's merger output weight with a 2e-9 gradient moving 2e-4 in
   step 1, and the towers' later gradients respond more strongly to it). One-process float32 against float64:
   step 3's gradients differ by 1.5e-4 (Qwen3-VL). Two one-process float32 runs differing only in GEMM padding
   (`mimo.gemm_alignment`, which layouts without TP apply and the reference does not): 3.1e-5 in step 3's
   gradient norm, 4.8e-4 in the final parameters (Qwen2.5-VL). Their later steps' norms and gradients and their
   final parameters get 1e-3 (Qwen3-VL) and 3e-3 (Qwen2.5-VL), about 6 times those floors and 30 times under a
   wrong update's ~1e-1; their losses and first step keep 1e-5 (a wrong gradient, such as a missed TP sum of
   the q/k norms', shows there, from identical parameters).
2. **bfloat16** compute with float32 master weights, 20 steps: finite, decreasing, and at every step within
   `BF16_BAND` times the largest gap between the one-GPU bf16 and float32 curves (the size of bf16's own
   rounding drift) of the one-GPU bf16 curve. Why 4: the reference autocasts (norms, softmax and loss stay in
   float32), as mimo's DDP modules do, but FSDP2's mixed precision casts whole parameters, so every op of an
   FSDP2 row runs in bf16 and drifts from float32 about twice as far; the two drifts add. (A first run with 2
   failed only colocated-dp2-tp2-fsdp, at 2.3×; a wrong gradient shows in the float32 check, not here, where
   Adam's scale invariance would hide it anyway.) Steps 4-20 run with a host sync (`torch.cuda.synchronize()`)
   at every phase boundary on every rank: the deployments benchmark's phase timer, which once deadlocked the
   heterogeneous layout on a lazily created NCCL communicator.
3. **one host sync per step** (CUDA's sync debug mode), on step 3, after two warm-up steps. The Qwen-VL rows
   allow, besides it, syncs in the towers' own files only (`TOWER_FILES`): each tower call builds its geometry's
   index tensors on the host from the grids and copies them without pinning (`VisionGeometry.to`,
   `segment_attention`), a per-call sync the ViT never makes; the report counts them, and any sync elsewhere
   (bridges, patch balance, DeepStack between stages) fails the row.
Run: `python -m pytest tests/gpu -q` on a machine with two GPUs (tests/gpu/README.md has the last figures).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mimo.config import MimoParallelismConfig
from mimo.data import ModalitySpec, SyntheticDataset
from mimo.data.packing import PaddedText
from mimo.ddp_shards import full_tensor
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, unwrap, wrapped_modules
from mimo.models import ViTConfig
from mimo.provider import MimoModelProvider
from mimo.testing import run_distributed
from mimo.training.step import MimoTrainer
from tests.training import test_qwen_parity as qwen
from tests.training.test_parity import (
    CLIP,
    GLOBAL_BATCH,
    MICRO,
    OPTIM,
    _freezing,
    full_params,
    provider,
    train_one_process,
)

RTOL, PARAM_RTOL = 1e-5, 1e-4
BF16_BAND = 4  # times the one-GPU bf16 curve's own drift from float32: see the module docstring
BF16_STEPS, SYNCED_FROM = 20, 3  # steps 0-1 warm up, step 2 counts syncs, steps 3.. sync at every phase boundary
NOISE_ONLY = ("attn.k_proj.bias",)  # exactly-zero gradient in exact arithmetic: see the module docstring
TOWER_FILES = ("qwen_vision.py", "qwen_vision_geometry.py", "segment_attention.py")  # 3. in the docstring
ADAM_NOISE = {"qwen2_5_vl": 3e-3, "qwen3_vl": 1e-3}  # steps after the first where AdamW amplifies rounding: 1.


def _tf32_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@dataclass(frozen=True)
class Row:
    """What one layout trains: `model` "vit" (the parity suite's tiny ViT into a 2-layer decoder, `_layers` under
    VPP) or a Qwen-VL family (`test_qwen_parity`'s tiny model, images of four sizes packed, M-RoPE positions);
    `frozen` False, True (LLaVA stage 1: encoder and language model frozen, projection trained) or "tower" (encoder
    and projection frozen, language model trained: no gradient crosses the bridge); tied embeddings (the ViT
    model; Qwen3-VL's are tied by its spec); the DP kind ("fsdp-never": FSDP2 with that reshard policy)."""

    layout: dict
    frozen: bool | str = False
    tied: bool = False
    dp_kind: str = "ddp"
    model: str = "vit"

    @property
    def reference_key(self) -> tuple:
        """What the one-GPU reference depends on."""
        return self.model, self.frozen, self.tied, _layers(self.layout)


def _provider(row: Row, layout: dict | None, device: torch.device) -> MimoModelProvider:
    """The row's model in float32 on `device`, placed by `layout` (None: one process)."""
    frozen = TOWER if row.frozen == "tower" else _freezing(row.frozen, ("images",))
    if row.model == "vit":
        return provider(layout, ("images",), row.tied, _layers(row.layout), params_dtype=torch.float32,
                        device=device, **frozen)
    return qwen.provider(row.model, layout, params_dtype=torch.float32, device=device, **frozen)


def _batches(model: str, steps: int) -> list:
    """`steps` global batches of the row's model, float32 (the first steps alike for any count)."""
    if model != "vit":
        return qwen.batches(model, steps, torch.float32)
    spec = ModalitySpec.image(256, ViTConfig.tiny().tokens_per_image)
    data = SyntheticDataset(GLOBAL_BATCH * steps, {"images": spec}, items_per_sample=(0, 1, 3), seed=5,
                            dtype=torch.float32)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(steps)]


def _cpu(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.float().cpu() for n, p in params.items()}


# -- one GPU ---------------------------------------------------------------------------------------------
def reference(row: Row, compute: torch.dtype, steps: int) -> tuple[list, list, list, dict]:
    """One process on GPU 0 (`test_parity.train_one_process`): MimoModel.forward per micro-batch (under autocast
    for bf16; M-RoPE positions for Qwen-VL), torch's clipping, mimo's AdamW (the same fused kernel); the losses,
    gradient norms, clipped gradients and final parameters."""
    _tf32_off()
    device = torch.device("cuda", 0)
    prov = _provider(row, None, device)
    model = prov.provide()
    grads: list[dict] = []

    def clipped(model) -> None:
        grads.append(_cpu({n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    positions = None if prov.text_positions is None else prov.text_positions.rows
    losses, norms = train_one_process(model, _batches(row.model, steps), MICRO, positions, device,
                                      None if compute == torch.float32 else compute, clipped)
    return losses, norms, grads, _cpu({n: p.detach() for n, p in model.named_parameters()})


# -- two GPUs --------------------------------------------------------------------------------------------
def _trainer(row: Row, compute: str | None) -> MimoTrainer:
    device = torch.device("cuda", torch.cuda.current_device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = _provider(row, row.layout, device)
        kind, _, reshard = row.dp_kind.partition("-")  # "fsdp-never": FSDP2 with that reshard policy
        wrap = ModuleDistributedConfig(kind, compute and getattr(torch, compute),
                                       reshard_after_forward=reshard or "default")
        model = prov.provide_distributed_model(DistributedConfig(wrap))
    dtype = torch.bfloat16 if compute == "bfloat16" else torch.float32
    return MimoTrainer(model, prov.build_infra(), hidden_size=prov.language_config.hidden_size,
                       global_batch_size=GLOBAL_BATCH, num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP,
                       activation_dtype=dtype, device=device, embedding_widths=prov.embedding_widths(),
                       text_layout=PaddedText(positions_rule=prov.text_positions))


def _synced_timer(seconds: dict[str, float], key: str, fn, *args) -> None:
    """The step's phase timer with a host sync on both sides of every phase."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    seconds[key] += time.perf_counter() - t0


def _count_syncs(trainer: MimoTrainer, batch):
    """One step's result, and file:line of every synchronizing call it makes."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Every gradient this rank's modules hold, whole (a collective for sharded ones), under single-process names."""
    out = {}
    for name, module in wrapped_modules(model).items():
        prefix = "language_model." if name == "language" else f"modality_submodules.{name}."
        for n, p in unwrap(module).named_parameters():
            if p.grad is not None:
                out[prefix + n] = full_tensor(p.grad, p).float().cpu()
    return out


def _recording_grads(trainer: MimoTrainer) -> list[dict]:
    """Make the trainer keep its clipped gradients, whole, just before each optimizer step."""
    grads: list[dict] = []
    step = trainer._optimizer_step

    def recorded(skipped: bool) -> None:
        grads.append(_full_grads(trainer.model))
        step(skipped)

    trainer._optimizer_step = recorded
    return grads


def train_layout(rank: int, world_size: int, row: Row) -> dict:
    """float32 parity steps, then the bf16 run with its sync count and its synchronized phases."""
    _tf32_off()
    trainer = _trainer(row, None)
    grads = _recording_grads(trainer)
    fp32 = [trainer.train_step(b) for b in _batches(row.model, 3)]
    params = _cpu(full_params(trainer.model))
    trainer = _trainer(row, "bfloat16")
    bf16, syncs = [], []
    for step, batch in enumerate(_batches(row.model, BF16_STEPS)):
        if step == SYNCED_FROM - 1:
            result, syncs = _count_syncs(trainer, batch)
            bf16.append(result)
            continue
        if step == SYNCED_FROM:
            trainer._timed = _synced_timer
        bf16.append(trainer.train_step(batch))
    return {"losses": [r.loss for r in fp32], "norms": [r.grad_norm for r in fp32], "grads": grads, "params": params,
            "bf16": [r.loss for r in bf16], "syncs": syncs, "balance": [r.patch_balance for r in fp32]}


ENCODER_PP2 = {"images": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1},
               "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}}
TOWER = {"freeze_modality_encoders": {"images": True}, "freeze_modality_projections": {"images": True}}
LAYOUTS = {
    # id: layout, frozen (`Row.frozen`), tied embeddings, DP kind: the ViT model
    "homogeneous-dp2": ({"images": {}, "language": {}}, False, False, "ddp"),
    "homogeneous-dp2-fsdp": ({"images": {}, "language": {}}, False, False, "fsdp"),
    # FSDP2 gathering each block once a step (the blocks stay gathered over the micro-batches)
    "homogeneous-dp2-fsdp-never": ({"images": {}, "language": {}}, False, False, "fsdp-never"),
    "homogeneous-tp2": ({"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}},
                        False, False, "ddp"),
    "homogeneous-tp2-fsdp": ({"images": {"tensor_model_parallel_size": 2},
                              "language": {"tensor_model_parallel_size": 2}}, False, False, "fsdp"),
    "colocated-dp2-tp2": ({"images": {"data_parallel_size": 2},
                           "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1}},
                          False, False, "ddp"),
    "colocated-dp2-tp2-fsdp": ({"images": {"data_parallel_size": 2},
                                "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1}},
                               False, False, "fsdp"),
    "colocated-dp2-pp2": ({"images": {"data_parallel_size": 2},
                           "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}},
                          False, False, "ddp"),
    "colocated-dp2-pp2-fsdp": ({"images": {"data_parallel_size": 2},
                                "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}},
                               False, False, "fsdp"),
    "colocated-pp2-tied": ({"images": {"data_parallel_size": 2},
                            "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}},
                           False, True, "ddp"),
    "heterogeneous-images-first": ({"images": {"data_parallel_size": 1},
                                    "language": {"data_parallel_size": 1, "rank_offset": 1}}, False, False, "ddp"),
    "heterogeneous-language-first": ({"language": {"data_parallel_size": 1},
                                      "images": {"data_parallel_size": 1, "rank_offset": 1}}, False, False, "ddp"),
    "heterogeneous-fsdp": ({"images": {"data_parallel_size": 1},
                            "language": {"data_parallel_size": 1, "rank_offset": 1}}, False, False, "fsdp"),
    "llava-stage1-heterogeneous": ({"images": {"data_parallel_size": 1},
                                    "language": {"data_parallel_size": 1, "rank_offset": 1}}, True, False, "ddp"),
    # sequence parallelism (issue 13): the same checks as the TP2 rows above, the ViT's 17 tokens split 9 + 8
    "homogeneous-tp2-sp": ({"images": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                            "language": {"tensor_model_parallel_size": 2, "sequence_parallel": True}},
                           False, False, "ddp"),
    "homogeneous-tp2-sp-fsdp": ({"images": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                                 "language": {"tensor_model_parallel_size": 2, "sequence_parallel": True}},
                                False, False, "fsdp"),
    "colocated-dp2-tp2-sp": ({"images": {"data_parallel_size": 2},
                              "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                           "sequence_parallel": True}}, False, False, "ddp"),
    # context parallelism (issue 25): the K/V all-gather and its reduce-scatter under NCCL, images DP2 beside
    "colocated-dp2-cp2": ({"images": {"data_parallel_size": 2},
                           "language": {"context_parallel_size": 2, "data_parallel_size": 1}}, False, False, "ddp"),
    "colocated-dp2-cp2-fsdp": ({"images": {"data_parallel_size": 2},
                                "language": {"context_parallel_size": 2, "data_parallel_size": 1}},
                               False, False, "fsdp"),
    # interleaved 1F1B (issue 29): at PP 2 the ring's seam joins the two GPUs against stage 0 -> 1, on its own
    # p2p groups (NCCL pairs one (pair, group)'s messages in posting order); a 4-layer decoder, one per virtual stage
    "colocated-dp2-pp2-vpp2": ({"images": {"data_parallel_size": 2},
                                "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                             "virtual_pipeline_model_parallel_size": 2}}, False, False, "ddp"),
    # encoder pipeline parallelism (issue 29): the tower's stage s on the language model's stage s, the tower's
    # activations and their gradients between its stages on the GPUs' p2p groups, the colocated bridge from rank 1
    # (the tower's last stage) to rank 0 (the language model's first); trained, then LLaVA stage 1 (both pipelines
    # frozen, the projection trained: the frozen tower's stages exchange no gradient)
    "encoder-pp2-colocated-lm-pp2": (ENCODER_PP2, False, False, "ddp"),
    "encoder-pp2-colocated-lm-pp2-stage1": (ENCODER_PP2, True, False, "ddp"),
    # a frozen tower (encoder and projection): the frozen-aware bridges send no gradient back (`carries_grad`),
    # heterogeneous (no message) and colocated behind a tower pipeline (no reduce-scatter)
    "heterogeneous-frozen-tower": ({"images": {"data_parallel_size": 1},
                                    "language": {"data_parallel_size": 1, "rank_offset": 1}}, "tower", False, "ddp"),
    "encoder-pp2-colocated-lm-pp2-frozen-tower": (ENCODER_PP2, "tower", False, "ddp"),
}
QWEN_LAYOUTS = {
    # id: family, layout (test_qwen_parity's tiny models and packed images of four sizes; DDP). A tower at DP2
    # splits each micro-batch's images by patch count (`training.patch_balance`'s all-to-all), checked too.
    # The towers' fused QKV under TP (`FusedColwiseParallel`'s all-gather), Qwen3-VL's q/k norms (their
    # gradients summed over TP) and its tower's DeepStack mergers under TP
    "qwen25-homogeneous-tp2": ("qwen2_5_vl", {"images": {"tensor_model_parallel_size": 2},
                                              "language": {"tensor_model_parallel_size": 2}}),
    "qwen3-homogeneous-tp2": ("qwen3_vl", {"images": {"tensor_model_parallel_size": 2},
                                           "language": {"tensor_model_parallel_size": 2}}),
    # patch balance at DP2 (windowed and full attention in the tower)
    "qwen25-homogeneous-dp2": ("qwen2_5_vl", {"images": {}, "language": {}}),
    # DeepStack's features carried with the activations from LM stage 0 to 1 (layers 0-1 | 2-3), tied embeddings
    # across the stages, the tower at DP2 with patch balance
    "qwen3-colocated-dp2-lm-pp2": ("qwen3_vl", {"images": {"data_parallel_size": 2},
                                                "language": {"pipeline_model_parallel_size": 2,
                                                             "data_parallel_size": 1}}),
}
ROWS = {**{name: Row(*spec) for name, spec in LAYOUTS.items()},
        **{name: Row(layout, model=family) for name, (family, layout) in QWEN_LAYOUTS.items()}}

_REFERENCES: dict = {}


def _layers(layout: dict) -> int:
    """The decoder's depth for a layout: 2, or one layer per virtual stage under interleaved 1F1B."""
    language = layout["language"]
    vpp = language.get("virtual_pipeline_model_parallel_size", 1)
    return 2 if vpp == 1 else vpp * language.get("pipeline_model_parallel_size", 1)


def _reference(row: Row) -> dict:
    key = row.reference_key
    if key not in _REFERENCES:
        losses, norms, grads, params = reference(row, torch.float32, 3)
        bf16 = reference(row, torch.bfloat16, BF16_STEPS)[0]
        fp32 = reference(row, torch.float32, BF16_STEPS)[0]
        drift = max(_rel(b, f) for b, f in zip(bf16, fp32, strict=True))
        _REFERENCES[key] = {"losses": losses, "norms": norms, "grads": grads, "params": params, "bf16": bf16,
                            "bf16_band": BF16_BAND * drift}
    return _REFERENCES[key]


def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def _param_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _report(name: str, row: dict) -> None:
    """Append this layout's figures to $MIMO_GPU_REPORT (a JSON-lines file), if set, for tests/gpu/README.md."""
    path = os.environ.get("MIMO_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"layout": name, **row}) + "\n")


@pytest.mark.parametrize("name", list(ROWS))
def test_layout_on_two_gpus(name):
    row = ROWS[name]
    layout = MimoParallelismConfig.from_dict(row.layout).finalize(2)  # a typo fails here, not in the workers
    want = _reference(row)
    results = run_distributed(train_layout, 2, row, backend="nccl", timeout_s=300, pg_timeout_s=120)
    worst = {"loss": 0.0, "norm": 0.0, "grad": 0.0, "later_grad": 0.0, "param": 0.0, "bf16": 0.0}
    tensors: dict[str, float] = {}  # the largest difference of each gradient and parameter, for the report
    seen = set()
    for res in results:
        worst["loss"] = max(worst["loss"], *(_rel(g, w) for g, w in zip(res["losses"], want["losses"], strict=True)))
        worst["norm"] = max(worst["norm"], *(_rel(g, w) for g, w in zip(res["norms"], want["norms"], strict=True)))
        for step, (got, ref) in enumerate(zip(res["grads"], want["grads"], strict=True)):
            for n, g in got.items():
                if not n.endswith(NOISE_ONLY):
                    tensors[f"grad {step} {n}"] = _param_rel(g, ref[_single_process(n, ref)])
        for n, p in res["params"].items():
            key = _single_process(n, want["params"])
            seen.add(key)
            if not n.endswith(NOISE_ONLY):
                tensors[f"param {n}"] = _param_rel(p, want["params"][key])
        worst["bf16"] = max(worst["bf16"], *(_rel(g, w) for g, w in zip(res["bf16"], want["bf16"], strict=True)))
    worst["grad"] = max((v for k, v in tensors.items() if k.startswith("grad 0 ")), default=0.0)
    worst["later_grad"] = max((v for k, v in tensors.items() if k.startswith(("grad 1 ", "grad 2 "))), default=0.0)
    worst["param"] = max((v for k, v in tensors.items() if k.startswith("param")), default=0.0)
    syncs = {rank: res["syncs"] for rank, res in enumerate(results)}
    top = sorted(tensors.items(), key=lambda kv: -kv[1])[:3]
    _report(name, {**worst, "bf16_band": want["bf16_band"], "syncs": {r: len(s) for r, s in syncs.items()},
                   "largest": top})
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f"; largest {top}")
    assert seen == set(want["params"]), f"parameters nobody holds: {sorted(set(want['params']) - seen)}"
    first_norm = max(_rel(res["norms"][0], want["norms"][0]) for res in results)
    assert worst["loss"] <= RTOL and first_norm <= RTOL and worst["grad"] <= RTOL, (worst, top)
    later = ADAM_NOISE.get(row.model)
    assert worst["norm"] <= (later or RTOL), (worst, top)
    assert worst["later_grad"] <= (later or PARAM_RTOL) and worst["param"] <= (later or PARAM_RTOL), (worst, top)
    for rank, res in enumerate(results):
        curve = res["bf16"]
        assert all(math.isfinite(x) for x in curve), curve
        assert sum(curve[-5:]) < sum(curve[:5]), f"rank {rank}: bf16 loss did not decrease: {curve}"
    assert worst["bf16"] <= want["bf16_band"], (worst, want["bf16_band"])
    for rank, found in syncs.items():
        step = [f for f in found if row.model == "vit" or not f.startswith(TOWER_FILES)]
        assert len(step) == 1 and step[0].startswith("step.py"), f"rank {rank}: {sorted(Counter(found).items())}"
    if row.model != "vit":  # a tower at DP2 split its images by patch count
        images = layout.module_parallelisms["images"]
        balanced = [qwen.balanced(b, images.data_parallel_size, images.context_parallel_size)
                    for b in _batches(row.model, 3)]
        assert all(res["balance"] == balanced for res in results), [res["balance"] for res in results]


def _single_process(name: str, names: dict) -> str:
    """The single-process name of a parameter (a tied head on the last stage is the embedding)."""
    return name if name in names else name.replace("lm_head", "embed_tokens")
