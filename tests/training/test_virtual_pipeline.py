"""Interleaved 1F1B (virtual_pipeline_model_parallel_size): float64 parity with one process, and resume across VPP.

One world of 6 gloo ranks (images DP2 on ranks 0-1, the language model on 2-5) runs, in turn: PP2 × DP2 × VPP2
under DDP with tied embeddings (saving after step 1); TP2 × PP2 × VPP2 sequence-parallel (2 steps); CP2 × PP2 ×
VPP2 under FSDP2 (sharded over dp×cp) resuming that step-1 checkpoint; PP2 resuming it too (step 2); and TP2 × DP2
at PP1 resuming it (steps 2-3). A 4-layer decoder: chunk c of PP rank r holds layer 2c + r. One world of 8 ranks
runs an 8-layer decoder at TP2 × PP4 × VPP2 (images colocated, TP2 × DP4; saving after step 1) and TP2 × PP2 × VPP2
× DP2 resuming it. Every loss and final parameter equals the single-process model's (after as many steps) to a
relative 1e-8.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from mimo.config import LayoutError, MimoParallelismConfig
from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.models import Decoder, DecoderConfig
from mimo.provider import MimoModelProvider, ModuleSpec, pipeline_chunk_ranges
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.checkpoint import Checkpointer
from mimo.training.step import MimoTrainer
from tests.test_provider import modality_spec
from tests.training.test_parity import CLIP, GLOBAL_BATCH, OPTIM, TOKENS, dataset, full_params, train_one_process

IMAGES = ("images",)
STEPS, MICRO = 3, 4  # 4 micro-batches over PP 2: rank 0 warms up with 4 forwards of 8, then alternates
LAYERS = 4
LANG_PP2_DP2_VPP2 = {"pipeline_model_parallel_size": 2, "data_parallel_size": 2,
                     "virtual_pipeline_model_parallel_size": 2, "rank_offset": 2}
LANG_TP2_PP2_VPP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                     "virtual_pipeline_model_parallel_size": 2, "rank_offset": 2,
                     "sequence_parallel": True}  # each chunk's first block shards the sequence, its last gathers it
LANG_CP2_PP2_VPP2 = {"context_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                     "virtual_pipeline_model_parallel_size": 2, "rank_offset": 2}
LANG_PP2_DP2 = {"pipeline_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2}
LANG_TP2_DP2 = {"tensor_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2}


@dataclass(frozen=True)
class World:
    """What differs between the two worlds: the images' layout, the decoder's depth, the global batch."""

    images: dict
    layers: int
    global_batch: int


SIX = World({"data_parallel_size": 2}, LAYERS, GLOBAL_BATCH)
EIGHT = World({"tensor_model_parallel_size": 2, "data_parallel_size": 4}, 8, 16)  # colocated with the language model
LANG_TP2_PP4_VPP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 4, "data_parallel_size": 1,
                     "virtual_pipeline_model_parallel_size": 2}
LANG_TP2_PP2_VPP2_DP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 2,
                         "virtual_pipeline_model_parallel_size": 2}


def layout(language: dict, world: World = SIX) -> dict:
    return {"images": world.images, "language": language}


def provider(language: dict | None, tied: bool, world: World = SIX) -> MimoModelProvider:
    config = None if language is None else MimoParallelismConfig.from_dict(layout(language, world))
    return MimoModelProvider(ModuleSpec(Decoder, {"config": DecoderConfig.tiny(num_layers=world.layers,
                                                                                tie_embeddings=tied)}),
                             {"images": modality_spec("images")}, {"images": TOKENS["images"]}, config,
                             params_dtype=torch.float64, seed=3)


def batches(world: World = SIX) -> list:
    data = dataset(IMAGES)
    return [data.batch(range(s * world.global_batch, (s + 1) * world.global_batch)) for s in range(STEPS)]


def reference(tied: bool, steps: int = STEPS, world: World = SIX) -> tuple[list, list, dict]:
    """One process, `steps` steps: the losses and gradient norms of every step and the final parameters."""
    model = provider(None, tied, world).provide()
    losses, norms = train_one_process(model, batches(world)[:steps], MICRO)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def train(language: dict, tied: bool, root: str, save_at: int | None = None, load: str | None = None,
          data_parallel: str = "ddp", until: int = STEPS, world: World = SIX) -> dict:
    """Train `language`'s layout (loading `load` first) to step `until`, saving after step `save_at`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = provider(language, tied, world)
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(data_parallel)))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=world.global_batch,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    ckpt = Checkpointer(root)
    if load is not None:
        ckpt.load(load, trainer)
    losses, norms, data = [], [], batches(world)
    while trainer.step_count < until:
        result = trainer.train_step(data[trainer.step_count])
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if trainer.step_count == save_at:
            ckpt.save(trainer.step_count, trainer, {})
    names = sorted(n for n, _ in model.language_model.named_parameters()) if model.language_model else []
    return {"losses": losses, "norms": norms, "params": full_params(model), "names": names}


def every_layout(rank: int, world: int, root: str) -> dict:
    """The runs of the module docstring on this rank."""
    vpp1 = str(Checkpointer(f"{root}/vpp").path(1))
    return {"vpp": train(LANG_PP2_DP2_VPP2, True, f"{root}/vpp", save_at=1),
            "vpp_tp": train(LANG_TP2_PP2_VPP2, False, f"{root}/vpp_tp", until=2),
            "vpp_fsdp": train(LANG_CP2_PP2_VPP2, True, f"{root}/vpp_fsdp", load=vpp1, data_parallel="fsdp"),
            "pp": train(LANG_PP2_DP2, True, f"{root}/pp", load=vpp1, until=2),
            "pp1": train(LANG_TP2_DP2, True, f"{root}/pp1", load=vpp1)}


def pp4_layouts(rank: int, world: int, root: str) -> dict:
    """The 8-rank runs of the module docstring on this rank."""
    return {"pp4": train(LANG_TP2_PP4_VPP2, False, f"{root}/pp4", save_at=1, until=2, world=EIGHT),
            "pp2": train(LANG_TP2_PP2_VPP2_DP2, False, f"{root}/pp2", load=str(Checkpointer(f"{root}/pp4").path(1)),
                         until=2, world=EIGHT)}


def check(results: list[dict], want: tuple[list, list, dict], start: int, what: str) -> None:
    """Every rank's losses and gradient norms (Adam and clipping would hide a wrongly scaled gradient) from step
    `start` on and its parameters equal the reference's, and every parameter is held somewhere."""
    ref_losses, ref_norms, ref_params = want
    seen = set()
    for rank, res in enumerate(results):
        for key, ref_values in (("losses", ref_losses), ("norms", ref_norms)):
            for s, (got, ref) in enumerate(zip(res[key], ref_values[start:start + len(res[key])], strict=True)):
                assert abs(got - ref) <= 1e-8 * abs(ref), f"{what}: rank {rank} step {start + s + 1} {key} {got} {ref}"
        params = {n if n in ref_params else n.replace("lm_head", "embed_tokens"): p for n, p in res["params"].items()}
        assert_matches_reference(params, ref_params, f"{what}: rank {rank} parameter")
        seen.update(params)
    assert seen == set(ref_params), f"{what}: parameters nobody holds: {sorted(set(ref_params) - seen)}"


def test_interleaved_parity_and_resume_across_vpp_changes(tmp_path):
    runs = run_distributed(every_layout, 6, str(tmp_path), timeout_s=240)
    tied, untied2, tied2 = reference(True), reference(False, steps=2), reference(True, steps=2)
    check([r["vpp"] for r in runs], tied, 0, "PP2 x DP2 x VPP2")
    check([r["vpp_tp"] for r in runs], untied2, 0, "TP2+SP x PP2 x VPP2")
    check([r["vpp_fsdp"] for r in runs], tied, 1, "CP2 x PP2 x VPP2 under FSDP2, resumed from DDP")
    check([r["pp"] for r in runs], tied2, 1, "PP2 resumed from PP2 x VPP2")
    check([r["pp1"] for r in runs], tied, 1, "PP1 resumed from PP2 x VPP2")
    # PP rank 0 holds layers 0 and 2 (virtual stages 0 and 2) under their global names, with the embedding
    assert {n.split(".")[1] for n in runs[2]["vpp"]["names"] if n.startswith("layers.")} == {"0", "2"}
    assert "embed_tokens.weight" in runs[2]["vpp"]["names"] and "lm_head.weight" in runs[4]["vpp"]["names"]


def test_pp4_vpp2_with_tp_parity_and_resume_at_pp2(tmp_path):
    runs = run_distributed(pp4_layouts, 8, str(tmp_path), timeout_s=240)
    want = reference(False, steps=2, world=EIGHT)
    check([r["pp4"] for r in runs], want, 0, "TP2 x PP4 x VPP2")
    check([r["pp2"] for r in runs], want, 1, "TP2 x PP2 x VPP2 x DP2 resumed from TP2 x PP4 x VPP2")
    # PP rank 1's TP ranks (global 2 and 3) hold layers 1 and 5: virtual stages 1 and 5 of 8
    assert {n.split(".")[1] for n in runs[2]["pp4"]["names"] if n.startswith("layers.")} == {"1", "5"}


def test_chunk_ranges():
    assert pipeline_chunk_ranges(4, 2, 0, 2) == ((0, 1), (2, 3))
    assert pipeline_chunk_ranges(5, 2, 1, 2) == ((2, 3), (4, 5))
    assert pipeline_chunk_ranges(8, 2, 1) == ((4, 8),)


@pytest.mark.parametrize(("language", "micro", "message"), [
    ({"virtual_pipeline_model_parallel_size": 2}, 2, "pipeline_model_parallel_size is 1"),
    (LANG_PP2_DP2_VPP2, 3, "needs num_microbatches divisible by pipeline_model_parallel_size=2, got 3"),
    ({**LANG_PP2_DP2_VPP2, "virtual_pipeline_model_parallel_size": 0}, 2, "must be a positive integer"),
])
def test_bad_virtual_pipeline_is_one_line(language, micro, message):
    with pytest.raises(LayoutError, match=message) as e:
        MimoParallelismConfig.from_dict(layout(language)).finalize(6).validate_batch(12, micro)
    assert "\n" not in str(e.value)
