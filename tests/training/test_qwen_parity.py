"""Qwen-VL's parity rows: every deployment kind trains like the single-process model (float64, 2 steps of AdamW with
clipping; losses, gradient norms and final parameters to a relative 1e-8).

Every row whose tower has DP > 1 encodes the images split by patch count (`training.patch_balance`). Both families,
tiny: Qwen2.5-VL (windowed and full attention, sectioned M-RoPE) and Qwen3-VL (learned position
table, interleaved M-RoPE, DeepStack into decoder layers 0, 1 and 2 of 4: across the LM PP2 boundary, and under
sequence parallelism). Images of four sizes, packed, 0, 1 or 3 per sample. One 4-rank world runs every layout of a
family in turn (start-up paid once).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from mimo.config import MimoParallelismConfig
from mimo.data import ModalitySpec, SyntheticDataset
from mimo.data.packing import PackedText, PaddedText
from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.families.qwen_vl import QwenVLMimoProvider, QwenVLSpec
from mimo.models import DecoderConfig
from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen25VisionConfig
from mimo.models.rotary import MRopeLayout
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.optim import OptimizerConfig
from mimo.training.patch_balance import split_images, split_replicas, step_imbalance
from mimo.training.step import MimoTrainer
from tests.training.test_parity import full_params, train_one_process

STEPS, GLOBAL_BATCH, MICRO, CLIP = 2, 8, 2, 1.0
OPTIM = OptimizerConfig(lr=1e-2, weight_decay=0.1)
IMAGE = 64  # past the 64-id vocabulary, as the synthetic set needs
GRIDS = [(1, 4, 6), (1, 6, 4), (1, 2, 2), (1, 8, 2)]  # patches: 6, 6, 1 and 4 merged tokens

LAYOUTS = {
    "homogeneous-tp2-dp2": {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 2},
                            "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2}},
    "colocated-vit-dp4-lm-tp2": {"images": {"data_parallel_size": 4},
                                 "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2}},
    "heterogeneous-vit-dp2-lm-tp2": {"images": {"data_parallel_size": 2},
                                     "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                                  "rank_offset": 2}},
    "colocated-lm-pp2": {"images": {"data_parallel_size": 4},
                         "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}},
    "colocated-vit-tp2": {"images": {"tensor_model_parallel_size": 2, "data_parallel_size": 2},
                          "language": {"data_parallel_size": 4}},
    # context parallelism (issue 25): M-RoPE positions and DeepStack rows of each CP rank's chunks
    "heterogeneous-vit-dp2-lm-cp2": {"images": {"data_parallel_size": 2},
                                     "language": {"context_parallel_size": 2, "data_parallel_size": 1,
                                                  "rank_offset": 2}},
}
PACKED = ("heterogeneous-vit-dp2-lm-tp2", "heterogeneous-vit-dp2-lm-cp2")  # also run with packed rows
# Qwen3-VL only (DeepStack), packed: the pipeline carries layer 2's features to stage 1, and both stages add theirs
# into the sequence-sharded residual (a packed row's odd length over TP 2)
DEEPSTACK_SP_PP = ("colocated-vit-dp4-lm-tp2-pp2-sp-packed",
                   {"images": {"data_parallel_size": 4},
                    "language": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                 "data_parallel_size": 1, "sequence_parallel": True}})
# Qwen3-VL only, packed: a homogeneous tower under LM CP2 encodes each replica's images split over its CP ranks by
# patch count, and each CP rank receives only the rows (DeepStack's too) its chunks hold
HOMOGENEOUS_CP = ("homogeneous-cp2-dp2-packed", {"images": {"context_parallel_size": 2, "data_parallel_size": 2},
                                                 "language": {"context_parallel_size": 2, "data_parallel_size": 2}})

# Qwen3-VL only, packed, interleaved (issue 29): PP rank 0 holds layers 0 and 2, rank 1 layers 1 and 3, so DeepStack's
# features cross every virtual stage boundary, the last one from rank 1's chunk 0 back to rank 0's chunk 1
DEEPSTACK_VPP = ("colocated-vit-dp4-lm-pp2-vpp2-packed",
                 {"images": {"data_parallel_size": 4},
                  "language": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                               "data_parallel_size": 2}})


def spec(kind: str) -> QwenVLSpec:
    """A tiny model of `kind`: width 32, 4 decoder layers, 4 heads over 2 KV heads (Qwen2.5-VL's MLPs 44 wide, off a
    multiple of 8 as its 7B tower's 3420 is: layouts without TP pad them, `mimo.gemm_alignment`); Qwen3-VL's
    DeepStack features go after layers 0, 1 and 2 (so LM PP2, layers 0-1 | 2-3, has them on both sides of the
    boundary; not after the last layer, whose additions would reach only the unscored image positions)."""
    qwen3 = kind == "qwen3_vl"
    vision = (replace(Qwen3VisionConfig.tiny(), deepstack_visual_indexes=(2, 0, 3)) if qwen3 else
              replace(Qwen25VisionConfig.tiny(), intermediate_size=44))
    vision = replace(vision, out_hidden_size=32)
    language = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                             ffn_hidden_size=48 if qwen3 else 44, max_seq_len=256, qkv_bias=not qwen3, qk_norm=qwen3,
                             mrope=MRopeLayout((2, 1, 1), interleaved=qwen3),
                             deepstack_layers=(0, 1, 2) if qwen3 else (), tie_embeddings=qwen3)
    return QwenVLSpec(kind, vision, language, IMAGE, 65, 66, 67)


def provider(kind: str, layout: dict | None, **kw) -> QwenVLMimoProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return QwenVLMimoProvider(spec(kind), config, **{"params_dtype": torch.float64, "seed": 3, **kw})


def batches(kind: str, steps: int = STEPS, dtype: torch.dtype = torch.float64) -> list:
    """`steps` global batches (each sample drawn from its index alone: the first steps are alike for any count)."""
    patch = spec(kind).vision.patch_dim
    images = ModalitySpec.packed(IMAGE, patch, GRIDS, merge=4)
    data = SyntheticDataset(max(64, GLOBAL_BATCH * steps), {"images": images}, vocab_size=64,
                            items_per_sample=(0, 1, 3), seed=5, dtype=dtype)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(steps)]


def reference(kind: str) -> tuple[list, list, dict]:
    """One process: `MimoModel.forward` per micro-batch with M-RoPE positions, torch's clipping, mimo's AdamW."""
    prov = provider(kind, None)
    model = prov.provide()
    losses, norms = train_one_process(model, batches(kind), MICRO, prov.text_positions.rows)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_layouts(rank: int, world_size: int, kind: str) -> dict:
    """Every layout (and the packed row) in turn on this world; per row this rank's losses, norms, parameters."""
    out = {}
    rows = [(name, layout, False) for name, layout in LAYOUTS.items()]
    rows += [(name + "-packed", LAYOUTS[name], True) for name in PACKED]
    if kind == "qwen3_vl":
        rows += [(*DEEPSTACK_SP_PP, True), (*DEEPSTACK_VPP, True), (*HOMOGENEOUS_CP, True)]
    for name, layout, packed in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prov = provider(kind, layout)
            model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("ddp")))
        text = (PackedText if packed else PaddedText)(positions_rule=prov.text_positions)
        trainer = MimoTrainer(model, prov.build_infra(), hidden_size=32, global_batch_size=GLOBAL_BATCH,
                              num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP,
                              activation_dtype=torch.float64, text_layout=text,
                              embedding_widths=prov.embedding_widths())
        results = [trainer.train_step(batch) for batch in batches(kind)]
        out[name] = {"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
                     "params": full_params(model), "balance": [r.patch_balance for r in results],
                     "images_dp": layout["images"]["data_parallel_size"],
                     "images_cp": layout["images"].get("context_parallel_size", 1)}
    return out


def split(images, dp: int, cp: int):
    """The patch split the step makes: over the tower's DP ranks, or each replica's over its CP ranks."""
    return split_replicas(images, dp, cp) if cp > 1 else split_images(images, dp)


def balanced(batch, dp: int, cp: int = 1, micro: int = MICRO) -> dict:
    """The patch balance a step reports for `batch` with the tower at DP `dp` × CP `cp` (none at 1 × 1)."""
    if dp * cp == 1:
        return {}
    return {"images": step_imbalance([split(batch.microbatch(m, micro).modality_inputs["images"], dp, cp)
                                      for m in range(micro)])}


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_every_layout_trains_like_one_process(kind: str) -> None:
    ref_losses, ref_norms, ref_params = reference(kind)
    results = run_distributed(train_layouts, 4, kind, timeout_s=300)
    for name in results[0]:
        dp, cp = results[0][name]["images_dp"], results[0][name]["images_cp"]
        want = [balanced(b, dp, cp) for b in batches(kind)]
        assert all(res[name]["balance"] == want for res in results), f"{kind} {name}: images not split by patches"
        seen = set()
        for rank, per_rank in enumerate(results):
            res = per_rank[name]
            for what, got, want in (("loss", res["losses"], ref_losses), ("norm", res["norms"], ref_norms)):
                for s, (g, w) in enumerate(zip(got, want, strict=True)):
                    assert abs(g - w) <= 1e-8 * abs(w), f"{kind} {name}: rank {rank} step {s} {what} {g!r} != {w!r}"
            params = {n if n in ref_params else n.replace("lm_head", "embed_tokens"): p
                      for n, p in res["params"].items()}
            assert_matches_reference(params, ref_params, f"{kind} {name}: rank {rank} parameter")
            seen.update(params)
        assert seen == set(ref_params), f"{kind} {name}: parameters nobody holds: {sorted(set(ref_params) - seen)}"
