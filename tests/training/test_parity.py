"""The parity matrix (DESIGN §3): every supported layout trains like the single-process model.

float64, 3 steps of AdamW with global-norm clipping, batches mixing samples of 0, 1 and 3 images and
uneven text; every step's loss and every final parameter equal the reference to a relative 1e-8.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mimo.config import MimoParallelismConfig
from mimo.data import ModalitySpec, SyntheticDataset
from mimo.ddp_shards import full_tensor
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, unwrap, wrapped_modules
from mimo.models import (
    AudioConfig,
    Decoder,
    DecoderConfig,
    ViTConfig,
)
from mimo.provider import MimoModelProvider, ModuleSpec
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.optim import OptimizerConfig, make_adamw, param_groups
from mimo.training.step import MimoTrainer
from tests.test_provider import modality_spec  # tiny ViT / audio encoder + projector to width 64

STEPS, GLOBAL_BATCH, MICRO = 3, 8, 2
OPTIM = OptimizerConfig(lr=1e-2, weight_decay=0.1)
CLIP = 1.0
TOKENS = {"images": 256, "audio": 257}


def decoder_config(tied: bool, layers: int = 2) -> DecoderConfig:
    return DecoderConfig.tiny(num_layers=layers, tie_embeddings=tied)


def provider(layout: dict | None, modalities: tuple[str, ...], tied: bool = False, layers: int = 2,
             **kw) -> MimoModelProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return MimoModelProvider(ModuleSpec(Decoder, {"config": decoder_config(tied, layers)}),
                             {m: modality_spec(m) for m in modalities}, {m: TOKENS[m] for m in modalities},
                             config, **{"params_dtype": torch.float64, "seed": 3, **kw})


def dataset(modalities: tuple[str, ...]) -> SyntheticDataset:
    specs = {"images": ModalitySpec.image(256, ViTConfig.tiny().tokens_per_image),
             "audio": ModalitySpec.audio(257, AudioConfig.tiny().tokens_per_item)}
    return SyntheticDataset(64, {m: specs[m] for m in modalities}, items_per_sample=(0, 1, 3), seed=5,
                            dtype=torch.float64)


def batches(modalities: tuple[str, ...]) -> list:
    data = dataset(modalities)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(STEPS)]


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter this rank hosts, whole, under its single-process name."""
    out = {}
    for name, module in wrapped_modules(model).items():
        prefix = "language_model." if name == "language" else f"modality_submodules.{name}."
        for n, p in unwrap(module).named_parameters():
            out[prefix + n] = full_tensor(p.detach(), p).clone()
    return out


# -- the reference ---------------------------------------------------------------------------------------
def reference(modalities: tuple[str, ...], frozen: bool = False, tied: bool = False) -> tuple[list, list, dict]:
    """Single process: MimoModel.forward per micro-batch, torch's clipping, mimo's AdamW (`make_adamw`: the same
    fused kernel, so the exactly-zero key-bias gradients' rounding noise is scaled the same way).
    Returns the losses, the gradient norms and the final parameters."""
    model = provider(None, modalities, tied, **_freezing(frozen, modalities)).provide()
    losses, norms = train_one_process(model, batches(modalities))
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_one_process(model, steps: list, micro: int = MICRO, positions=None, device: torch.device | None = None,
                      compute: torch.dtype | None = None, clipped=None) -> tuple[list, list]:
    """The single-process reference loop: per-token mean over the global batch, `micro` micro-batches, torch's
    clipping, mimo's AdamW; the losses and the gradient norms of each step. `positions(input_ids, micro_batch)`:
    the text's position ids where the family computes its own (Qwen-VL's M-RoPE). The one-GPU reference of
    tests/gpu also gives `device` (each micro-batch's text and items copied there), `compute` (autocast to that
    dtype) and `clipped(model)` (called after clipping, before the optimizer step: to record the gradients)."""
    opt = make_adamw(param_groups(model, OPTIM.weight_decay), OPTIM)
    losses, norms = [], []
    for batch in steps:
        tokens = int(batch.num_label_tokens(model.special_token_ids))
        total = 0.0
        for m in range(micro):
            mb = batch.microbatch(m, micro)
            if device is not None:
                mb = mb.prefetch(device, modalities=mb.modality_inputs)
            extra = {} if positions is None else {"position_ids": positions(mb.input_ids, mb)}
            with torch.autocast(mb.input_ids.device.type, dtype=compute, enabled=compute is not None):
                loss_sum, _ = model(mb.input_ids, mb.labels, mb.modality_inputs, **extra)
            (loss_sum / tokens).backward()
            total += float(loss_sum.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)))
        if clipped is not None:
            clipped(model)
        opt.step()
        opt.zero_grad()
        losses.append(total / tokens)
    return losses, norms


def _freezing(frozen: bool, modalities: tuple[str, ...]) -> dict:
    """LLaVA stage 1: encoders and language model frozen, projections trained."""
    if not frozen:
        return {}
    return {"freeze_language_model": True, "freeze_modality_encoders": {m: True for m in modalities}}


# -- the distributed run ---------------------------------------------------------------------------------
def train_layout(rank: int, world_size: int, layout: dict, modalities: tuple[str, ...], frozen: bool,
                 tied: bool, wrap: dict) -> dict:
    """Train STEPS on this rank's part; return the losses and the parameters it holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leading stub ranks warn
        prov = provider(layout, modalities, tied, **_freezing(frozen, modalities))
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(**wrap)))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    results = [trainer.train_step(batch) for batch in batches(modalities)]
    return {"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
            "params": full_params(model)}


DDP, FSDP = {"data_parallel": "ddp"}, {"data_parallel": "fsdp"}
RECOMPUTE = {"recompute_granularity": "full"}  # every block runs its forward again in the backward: same numbers
NEVER = {"reshard_after_forward": "never"}  # FSDP2 gathers each block once a step and keeps it: same numbers
IMG2_LANG_TP2 = {"images": {"data_parallel_size": 2},
                 "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 2}}
SP = {"sequence_parallel": True}
IMG2_LANG_TP2_SP = {"images": {"data_parallel_size": 2},
                    "language": {**IMG2_LANG_TP2["language"], **SP}}
MATRIX = [
    # id, world, layout, modalities, frozen, tied, how each module is wrapped (`ModuleDistributedConfig`)
    ("1-homogeneous-dp2", 2, {"images": {}, "language": {}}, ("images",), False, False, DDP),
    ("2-homogeneous-tp2dp2", 4, {"images": {"tensor_model_parallel_size": 2},
                                 "language": {"tensor_model_parallel_size": 2}}, ("images",), False, False, DDP),
    ("3-colocated-dp4-tp2dp2", 4, {"images": {"data_parallel_size": 4},
                                   "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2}},
     ("images",), False, False, DDP),
    ("4-colocated-dp4-pp2dp2", 4, {"images": {"data_parallel_size": 4},
                                   "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}},
     ("images",), False, False, DDP),
    ("5-heterogeneous-1-1", 2, {"images": {"data_parallel_size": 1},
                                "language": {"data_parallel_size": 1, "rank_offset": 1}}, ("images",), False, False,
     DDP),
    ("6-fan-in-dp2-tp2", 4, IMG2_LANG_TP2, ("images",), False, False, DDP),
    ("7-fan-out-dp1-dp2", 3, {"images": {"data_parallel_size": 1},
                              "language": {"data_parallel_size": 2, "rank_offset": 1}}, ("images",), False, False,
     DDP),
    ("8-tp2-to-tp2pp2", 6, {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 1},
                            "language": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                         "data_parallel_size": 1, "rank_offset": 2}}, ("images",), False, False,
     DDP),
    ("9-two-modalities", 5, {"images": {"data_parallel_size": 2},
                             "audio": {"data_parallel_size": 1, "rank_offset": 2},
                             "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                          "rank_offset": 3}}, ("images", "audio"), False, False, DDP),
    ("10-leading-stub", 4, {"images": {"data_parallel_size": 1, "rank_offset": 1},
                            "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                         "rank_offset": 2}}, ("images",), False, False, DDP),
    ("11-llava-stage1", 3, {"images": {"data_parallel_size": 1},
                            "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                         "rank_offset": 1}}, ("images",), True, False, DDP),
    # LLaVA stage 1 over a pipeline: every stage frozen, the gradient still crosses both to the projector (issue 29)
    ("11-llava-stage1-pp2", 3, {"images": {"data_parallel_size": 1},
                                "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                             "rank_offset": 1}}, ("images",), True, False, DDP),
    ("12-tied-pp2", 4, {"images": {"data_parallel_size": 2},
                        "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                     "rank_offset": 2}}, ("images",), False, True, DDP),
    ("13-language-first", 4, {"language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1},
                              "images": {"data_parallel_size": 2, "rank_offset": 2}}, ("images",), False, False,
     DDP),
    ("6-fan-in-fsdp", 4, IMG2_LANG_TP2, ("images",), False, False, FSDP),
    # homogeneous interleaves encoder and language per micro-batch: FSDP2's unshard/reshard order changes
    ("2-homogeneous-tp2dp2-fsdp", 4, {"images": {"tensor_model_parallel_size": 2},
                                      "language": {"tensor_model_parallel_size": 2}}, ("images",), False, False,
     FSDP),
    ("1-homogeneous-dp2-fsdp-never", 2, {"images": {}, "language": {}}, ("images",), False, False, FSDP | NEVER),
    ("2-homogeneous-tp2dp2-fsdp-never", 4, {"images": {"tensor_model_parallel_size": 2},
                                            "language": {"tensor_model_parallel_size": 2}}, ("images",), False,
     False, FSDP | NEVER),
    # a pipeline stage's blocks are never resharded by default (micro-batches interleave)
    ("4-colocated-pp2dp2-fsdp", 4, {"images": {"data_parallel_size": 4},
                                    "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}},
     ("images",), False, False, FSDP),
    # recomputation: DDP over TP (its local shards are DTensors again while a block recomputes), FSDP2 over TP,
    # TP alone behind a fan-in, a frozen language model the gradient crosses (stage 1), only the first block, and
    # a pipeline
    ("2-homogeneous-tp2dp2-recompute", 4, {"images": {"tensor_model_parallel_size": 2},
                                           "language": {"tensor_model_parallel_size": 2}}, ("images",), False,
     False, DDP | RECOMPUTE),
    ("2-homogeneous-tp2dp2-fsdp-recompute", 4, {"images": {"tensor_model_parallel_size": 2},
                                                "language": {"tensor_model_parallel_size": 2}}, ("images",),
     False, False, FSDP | RECOMPUTE),
    ("6-fan-in-dp2-tp2-recompute", 4, IMG2_LANG_TP2, ("images",), False, False, DDP | RECOMPUTE),
    ("11-llava-stage1-recompute", 3, {"images": {"data_parallel_size": 1},
                                      "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                                   "rank_offset": 1}}, ("images",), True, False, DDP | RECOMPUTE),
    ("1-homogeneous-dp2-recompute-1", 2, {"images": {}, "language": {}}, ("images",), False, False,
     DDP | RECOMPUTE | {"recompute_num_layers": 1}),
    ("4-colocated-dp4-pp2dp2-recompute", 4, {"images": {"data_parallel_size": 4},  # 1F1B: several in flight
                                             "language": {"pipeline_model_parallel_size": 2,
                                                          "data_parallel_size": 2}}, ("images",), False, False,
     DDP | RECOMPUTE),
    # sequence parallelism (issue 13): the ViT's 17 tokens and the padded text split unevenly over TP 2
    ("14-homogeneous-tp2dp2-sp", 4, {"images": {"tensor_model_parallel_size": 2, **SP},
                                     "language": {"tensor_model_parallel_size": 2, **SP}}, ("images",), False, False,
     DDP),
    ("15-tp2sp-to-tp2pp2sp", 6, {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, **SP},
                                 "language": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                              "data_parallel_size": 1, "rank_offset": 2, **SP}}, ("images",),
     False, False, DDP),
    ("16-fan-in-tp2sp-fsdp", 4, IMG2_LANG_TP2_SP, ("images",), False, False, FSDP),
    ("17-llava-stage1-sp", 3, {"images": {"data_parallel_size": 1},  # gradients through a frozen SP model
                               "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                            "rank_offset": 1, **SP}}, ("images",), True, False, DDP),
    # DDP over SP with 1F1B: the norms' partial gradients stay local through every micro-batch's backward and are
    # summed over TP once, after the pipeline drains (`mimo.ddp_shards._ShardView`)
    ("18-colocated-tp2dp4sp-tp2pp2dp2sp", 8, {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 4,
                                                         **SP},
                                              "language": {"tensor_model_parallel_size": 2,
                                                           "pipeline_model_parallel_size": 2,
                                                           "data_parallel_size": 2, **SP}}, ("images",), False,
     False, DDP),
    ("14-homogeneous-tp2dp2-sp-recompute", 4, {"images": {"tensor_model_parallel_size": 2, **SP},
                                               "language": {"tensor_model_parallel_size": 2, **SP}}, ("images",),
     False, False, DDP | RECOMPUTE),
]

_REFERENCES: dict = {}


def cached_reference(modalities, frozen, tied):
    key = (modalities, frozen, tied)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(modalities, frozen, tied)
    return _REFERENCES[key]


@pytest.mark.parametrize(("name", "world", "layout", "modalities", "frozen", "tied", "wrap"), MATRIX,
                         ids=[row[0] for row in MATRIX])
def test_parity(name, world, layout, modalities, frozen, tied, wrap):
    ref_losses, ref_norms, ref_params = cached_reference(modalities, frozen, tied)
    results = run_distributed(train_layout, world, layout, modalities, frozen, tied, wrap, timeout_s=240)
    worst, seen = 0.0, set()
    for rank, res in enumerate(results):
        for s, (got, want) in enumerate(zip(res["losses"], ref_losses, strict=True)):
            rel = abs(got - want) / abs(want)
            assert rel <= 1e-8, f"{name}: rank {rank} step {s} loss {got!r} != reference {want!r} ({rel:.1e})"
            worst = max(worst, rel)
        for s, (got, want) in enumerate(zip(res["norms"], ref_norms, strict=True)):  # Adam hides a wrong clip
            rel = abs(got - want) / abs(want)
            assert rel <= 1e-8, f"{name}: rank {rank} step {s} gradient norm {got!r} != reference {want!r}"
            worst = max(worst, rel)
        params = {n if n in ref_params else n.replace("lm_head", "embed_tokens"): p  # tied: the embedding's
                  for n, p in res["params"].items()}
        worst = max(worst, assert_matches_reference(params, ref_params, f"{name}: rank {rank} parameter"))
        seen.update(params)
    assert seen == set(ref_params), f"{name}: parameters nobody holds: {sorted(set(ref_params) - seen)}"
    print(f"\n{name}: largest relative difference {worst:.1e}")
