"""Encoder pipeline parallelism of the Qwen-VL towers (issue 29): float64 parity with one process, packed images.

One world of 6 gloo ranks runs, in turn (the tiny models of `test_qwen_parity`, images of four sizes packed, 0, 1 or
3 per sample): a Qwen2.5-VL tower PP2 × DP2 on ranks 0-3 (full attention in blocks 1 and 2: window and full blocks on
both stages; each micro-batch's images split over the DP replicas by patch count, each replica's pipeline encoding
its share) into a TP2 language model on 4-5; a Qwen3-VL tower the same way (DeepStack from layers 2, 0 and 3: layer
0's features merged on stage 0 and carried to stage 1 with the hidden states), saving after step 1; the Qwen3-VL
tower frozen into a PP2 language model (forward only: no gradient crosses its stages); the Qwen3-VL tower PP2 × DP2
colocated with a PP2 × DP2 language model on ranks 2-5 (DeepStack across both pipelines); the Qwen3-VL tower
TP2 × PP2 under FSDP2 (each stage's blocks and DeepStack mergers sharded) fanning out to a DP2 language model; and
the Qwen3-VL tower PP1 (DP2) resuming the PP2 checkpoint. Every loss, gradient norm and final parameter equals
the single-process model's to a relative 1e-8, and both ends of every (rank pair, group) post their messages in the
same order (NCCL pairs them by order, `test_pipeline_traffic.nccl_mismatches`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from mimo.config import MimoParallelismConfig
from mimo.data.packing import PaddedText
from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.families.qwen_vl import QwenVLMimoProvider
from mimo.models.qwen_vision import Qwen3VisionTower, Qwen25VisionTower
from mimo.testing import run_distributed
from mimo.training.checkpoint import Checkpointer
from mimo.training.encoder_pipeline import _TAG_BASE
from mimo.training.plan import plan_run
from mimo.training.run_config import parse_run_config
from mimo.training.step import MimoTrainer
from tests.training.test_encoder_pipeline import run_steps, whole_and_stages
from tests.training.test_parity import train_one_process
from tests.training.test_pipeline_traffic import Recorder, nccl_mismatches
from tests.training.test_qwen_parity import CLIP, GLOBAL_BATCH, MICRO, OPTIM, STEPS, batches, spec
from tests.training.test_virtual_pipeline import check

PP2_DP2 = {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}
TP2 = {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 4}
ROWS = {  # name: (kind, layout, frozen tower)
    "qwen25_pp2": ("qwen2_5_vl", {"images": PP2_DP2, "language": TP2}, False),
    "qwen3_pp2": ("qwen3_vl", {"images": PP2_DP2, "language": TP2}, False),
    "qwen3_frozen": ("qwen3_vl", {"images": PP2_DP2, "language": {"pipeline_model_parallel_size": 2,
                                                                  "data_parallel_size": 1, "rank_offset": 4}}, True),
    "qwen3_colocated": ("qwen3_vl", {"images": {**PP2_DP2, "rank_offset": 2},  # ranks 0-1: stubs
                                     "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2,
                                                  "rank_offset": 2}}, False),
    "qwen3_tp_pp": ("qwen3_vl", {"images": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                            "data_parallel_size": 1},
                                 "language": {"data_parallel_size": 2, "rank_offset": 4}}, False),
    "qwen3_pp1": ("qwen3_vl", {"images": {"data_parallel_size": 2},
                               "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2,
                                            "rank_offset": 2}}, False),
}


def _spec(kind: str):
    """`test_qwen_parity`'s tiny model; Qwen2.5-VL's full attention in blocks 1 and 2 (one on each PP2 stage)."""
    base = spec(kind)
    return base if kind == "qwen3_vl" else replace(base, vision=replace(base.vision, fullatt_block_indexes=(1, 2)))


def _provider(kind: str, layout: dict | None, frozen: bool) -> QwenVLMimoProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return QwenVLMimoProvider(_spec(kind), config, params_dtype=torch.float64, seed=3, freeze_vision_encoder=frozen)


def reference(kind: str, frozen: bool = False) -> tuple[list, list, dict]:
    """One process (`test_qwen_parity.reference`'s loop): every step's loss and gradient norm, the final parameters."""
    prov = _provider(kind, None, frozen)
    model = prov.provide()
    losses, norms = train_one_process(model, batches(kind), MICRO, prov.text_positions.rows)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def train(kind: str, layout: dict, root: str, frozen: bool = False, save_at: int | None = None,
          load: str | None = None, data_parallel: str = "ddp") -> dict:
    """Train `layout` (loading `load` first) to the last step, saving after step `save_at`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = _provider(kind, layout, frozen)
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(data_parallel)))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=32, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64,
                          text_layout=PaddedText(positions_rule=prov.text_positions),
                          embedding_widths=prov.embedding_widths())
    return run_steps(trainer, model, batches(kind), root, save_at, load)


def every_row(rank: int, world: int, root: str) -> dict:
    """The runs of the module docstring on this rank, each with every point-to-point message it posted."""
    out = {}
    for name, (kind, layout, frozen) in ROWS.items():
        save_at = 1 if name == "qwen3_pp2" else None
        load = str(Checkpointer(f"{root}/qwen3_pp2").path(1)) if name == "qwen3_pp1" else None
        with Recorder() as recorder:
            out[name] = train(kind, layout, f"{root}/{name}", frozen, save_at, load,
                              "fsdp" if name == "qwen3_tp_pp" else "ddp")
        out[name]["posted"] = recorder.trace
    return out


def _stage_messages(trace: list, rank: int) -> dict[str, int]:
    """Messages rank `rank` (0-3) posted to or from the other stage of its tower's PP2 × DP2 pipeline
    (`EncoderStages`' tags: from 1 << 24, even forward, odd backward), over the run's steps."""
    peer = (rank + 2) % 4
    tags = [tag for _, to, _, tag, _ in trace if to == peer and tag >= _TAG_BASE]
    return {"forward": sum(t % 2 == 0 for t in tags), "backward": sum(t % 2 == 1 for t in tags)}


def test_qwen_tower_pipelines_match_one_process_and_resume_across_tower_pp(tmp_path):
    runs = run_distributed(every_row, 6, str(tmp_path), timeout_s=240)
    qwen25, qwen3 = reference("qwen2_5_vl"), reference("qwen3_vl")
    check([r["qwen25_pp2"] for r in runs], qwen25, 0, "Qwen2.5-VL tower PP2 x DP2 -> language TP2")
    check([r["qwen3_pp2"] for r in runs], qwen3, 0, "Qwen3-VL tower PP2 x DP2 -> language TP2")
    check([r["qwen3_frozen"] for r in runs], reference("qwen3_vl", frozen=True), 0,
          "frozen Qwen3-VL tower PP2 x DP2 -> language PP2")
    check([r["qwen3_colocated"] for r in runs], qwen3, 0, "Qwen3-VL tower PP2 x DP2 on language PP2 x DP2's ranks")
    check([r["qwen3_tp_pp"] for r in runs], qwen3, 0, "Qwen3-VL tower TP2 x PP2 under FSDP2 -> language DP2")
    check([r["qwen3_pp1"] for r in runs], qwen3, 1, "Qwen3-VL tower PP1, resumed from PP2")
    for name in runs[0]:  # NCCL pairs a (pair, group)'s messages by posting order: both ends post alike
        assert nccl_mismatches([r[name]["posted"] for r in runs]) == [], name
    # per step, between the tower's stages: one message per micro-batch forward (its size from the grids) and,
    # trained, one gradient back; frozen, none back
    each = STEPS * MICRO
    for rank in range(4):
        assert _stage_messages(runs[rank]["qwen3_pp2"]["posted"], rank) == {"forward": each, "backward": each}
        assert _stage_messages(runs[rank]["qwen3_frozen"]["posted"], rank) == {"forward": each, "backward": 0}
    # stage 0: the patch embedding, positions, blocks 0-1 and layer 0's DeepStack merger (index 1); stage 1 the rest
    stage0, stage1 = set(runs[0]["qwen3_pp2"]["names"]), set(runs[2]["qwen3_pp2"]["names"])
    assert {n.split(".")[2] for n in stage0 if ".blocks." in n} == {"0", "1"}, stage0
    assert {n.split(".")[2] for n in stage1 if ".blocks." in n} == {"2", "3"}, stage1
    assert {n.split(".")[2] for n in stage0 if "deepstack" in n} == {"1"}
    assert {n.split(".")[2] for n in stage1 if "deepstack" in n} == {"0", "2"}
    assert "encoder.pos_embed.weight" in stage0 and not any(".merger." in n for n in stage0)
    assert "encoder.merger.linear_fc2.weight" in stage1 and not any("_embed" in n for n in stage1)


def test_qwen_tower_stages_compose_to_the_whole_tower():
    """Stages built by layer range (three: a middle one receives and sends DeepStack features), under the whole
    tower's names, run one after another on each other's messages give its output and its DeepStack features."""
    grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]])
    for tower, kind in ((Qwen25VisionTower, "qwen2_5_vl"), (Qwen3VisionTower, "qwen3_vl")):
        config = _spec(kind).vision
        whole, stages = whole_and_stages(tower, config, (0, 1, 3, config.depth))
        x = patches = torch.randn(int(grid.prod(1).sum()), config.patch_dim, dtype=torch.float64)
        for stage in stages:
            assert stage.has_front or x.numel() == stage.stage_input_numel(grid)
            x = stage(x, grid)
        want = whole(patches, grid)
        for got, ref in zip((x.embeddings, *x.deepstack), (want.embeddings, *want.deepstack), strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_qwen_vl_run_plans_a_pipelined_tower():
    """The run config's path (`plan_run`, which refused Qwen-VL's towers under encoder PP) accepts one now."""
    config = parse_run_config({"model": {"family": "qwen_vl", "preset": "tiny-qwen3-vl"},
                               "parallelism": {"images": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1},
                                               "language": {"data_parallel_size": 1, "rank_offset": 2}},
                               "train": {"global_batch_size": 4}, "data": {"name": "synthetic"}})
    plan_run(config, 3)
