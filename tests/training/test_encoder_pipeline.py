"""Encoder pipeline parallelism (issue 29): float64 parity with one process, frozen stages, resume across encoder PP.

One world of 6 gloo ranks runs, in turn: images PP2 × DP2 on ranks 0-3 fanning in to a TP2 language model on 4-5
(trainable, saving after step 1); the same tower frozen (LLaVA stage 1: tower and language model frozen, the
projection trained) into a PP2 language model; images PP2 × DP2 colocated with a PP2 × DP2 language model on ranks
2-5, trained and frozen, and with a CP2 × PP2 language model there; a 3-block tower over PP3 (ranks 2-4: a middle
stage) into one language rank; images TP2 × PP2 under FSDP2 fanning out to a DP2 language model, resuming that
step-1 checkpoint; and images PP1 (DP2) resuming it too. Every loss and final parameter equals the single-process
model's to a relative 1e-8, and both ends of every (rank pair, group) post their messages in the same order (NCCL
pairs them by order, `test_pipeline_traffic.nccl_mismatches`). In the first step of the first two runs each encoder
rank records the point-to-point messages it exchanges with the other stage of its pipeline and the tensors autograd
saves.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

from mimo.config import LayoutError, MimoParallelismConfig
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, unwrap
from mimo.models import AudioConfig, AudioEncoder, ViTConfig, ViTEncoder, init_parameters
from mimo.provider import ProviderError
from mimo.testing import run_distributed
from mimo.training.checkpoint import Checkpointer
from mimo.training.step import MimoTrainer, StepResult
from tests.training.test_parity import (
    CLIP,
    GLOBAL_BATCH,
    MICRO,
    OPTIM,
    batches,
    full_params,
    provider,
    reference,
    train_one_process,
)
from tests.training.test_pipeline_traffic import Recorder, nccl_mismatches
from tests.training.test_virtual_pipeline import check

IMAGES = ("images",)
PP2_DP2 = {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}
TRAINED = {"images": PP2_DP2, "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 4}}
FROZEN = {"images": PP2_DP2, "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                          "rank_offset": 4}}
TP_PP = {"images": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1},
         "language": {"data_parallel_size": 2, "rank_offset": 4}}
COLOCATED = {"images": {**PP2_DP2, "rank_offset": 2},  # ranks 0-1 are stubs; stage s on the language's stage s
             "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2}}
COLOCATED_CP = {"images": COLOCATED["images"],  # each CP rank of the language's stage 0 gets its chunks' rows
                "language": {**COLOCATED["language"], "context_parallel_size": 2, "data_parallel_size": 1}}
PP3 = {"images": {"pipeline_model_parallel_size": 3, "data_parallel_size": 1, "rank_offset": 2},  # 0-1: stubs
       "language": {"data_parallel_size": 1, "rank_offset": 5}}
DEEP_VIT = ViTConfig(**{**ViTConfig.tiny().__dict__, "num_layers": 4})  # 3 blocks run: one per stage of PP3
PP1 = {"images": {"data_parallel_size": 2},
       "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2}}
FREEZE = {"freeze_language_model": True, "freeze_modality_encoders": {"images": True}}


def _provider(layout: dict | None, deep: bool = False, **kw):
    """The parity tests' tiny model; `deep`: its tower has 3 blocks (`DEEP_VIT`)."""
    prov = provider(layout, IMAGES, **kw)
    if deep:
        prov.modality_submodules_spec["images"].submodules["encoder"].params["config"] = DEEP_VIT
    return prov


def _deep_reference() -> tuple[list, list, dict]:
    """One process with the 3-block tower: every step's loss and gradient norm, and the final parameters."""
    model = _provider(None, deep=True).provide()
    losses, norms = train_one_process(model, batches(IMAGES))
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _stage_peer(rank: int) -> int | None:
    """The other stage of this rank's encoder pipeline in the PP2 × DP2 layouts (ranks 0-1 stage 0, 2-3 stage 1)."""
    return {0: 2, 1: 3, 2: 0, 3: 1}.get(rank)


def _recording(fn, seen: list[tuple[str, int]]):
    """`fn` (a dist point-to-point call) that also notes each message to or from the other encoder stage, as
    ('forward' | 'backward', peer) by its group's direction (tags: even forward, odd backward)."""
    @functools.wraps(fn)
    def call(tensor, *args, **kwargs):
        peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
        if peer == _stage_peer(dist.get_rank()):
            seen.append(("backward" if kwargs.get("tag", 0) % 2 else "forward", peer))
        return fn(tensor, *args, **kwargs)
    return call


def _recorded_step(trainer: MimoTrainer, batch) -> tuple[StepResult, dict]:
    """One step, with the messages this rank exchanged with its encoder pipeline peer and autograd's saved tensors."""
    seen: list[tuple[str, int]] = []
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += 1
        return t

    patch = pytest.MonkeyPatch()
    for name in ("send", "recv", "isend", "irecv"):
        patch.setattr(dist, name, _recording(getattr(dist, name), seen))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = trainer.train_step(batch)
    finally:
        patch.undo()
    return result, {"forward": sum(k == "forward" for k, _ in seen), "backward": sum(k == "backward" for k, _ in seen),
                  "saved": saved[0]}


def train(layout: dict, root: str, frozen: bool = False, save_at: int | None = None, load: str | None = None,
          data_parallel: str = "ddp", record: bool = False, deep: bool = False) -> dict:
    """Train `layout` (loading `load` first) to the last step, saving after step `save_at`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = _provider(layout, deep, **(FREEZE if frozen else {}))
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(data_parallel)))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    traffic = []

    def step(batch) -> StepResult:  # the first step recorded where asked
        if record and not traffic:
            result, seen = _recorded_step(trainer, batch)
            traffic.append(seen)
            return result
        return trainer.train_step(batch)
    return {**run_steps(trainer, model, batches(IMAGES), root, save_at, load, step),
            "traffic": traffic[0] if traffic else None}


def run_steps(trainer: MimoTrainer, model, data: list, root: str, save_at: int | None = None,
              load: str | None = None, step=None) -> dict:
    """Load `load` first, then train to the last of `data` (each step `step(batch)`, default the trainer's),
    saving after step `save_at`: every step's loss and gradient norm, the final parameters and the names of the
    images module's parameters this rank holds."""
    ckpt = Checkpointer(root)
    if load is not None:
        ckpt.load(load, trainer)
    losses, norms = [], []
    while trainer.step_count < len(data):
        result = (step or trainer.train_step)(data[trainer.step_count])
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if trainer.step_count == save_at:
            ckpt.save(trainer.step_count, trainer, {})
    images = unwrap(model.modality_submodules["images"]) if "images" in model.modality_submodules else None
    return {"losses": losses, "norms": norms, "params": full_params(model),
            "names": sorted(n for n, _ in images.named_parameters()) if images is not None else []}


def every_layout(rank: int, world: int, root: str) -> dict:
    """The runs of the module docstring on this rank, each with every point-to-point message it posted."""
    step1 = str(Checkpointer(f"{root}/pp2").path(1))
    runs = {"pp2": lambda: train(TRAINED, f"{root}/pp2", save_at=1, record=True),
            "frozen": lambda: train(FROZEN, f"{root}/frozen", frozen=True, record=True),
            "colocated": lambda: train(COLOCATED, f"{root}/colocated"),
            "colocated_frozen": lambda: train(COLOCATED, f"{root}/colocated_frozen", frozen=True),
            "colocated_cp": lambda: train(COLOCATED_CP, f"{root}/colocated_cp"),
            "pp3": lambda: train(PP3, f"{root}/pp3", deep=True),
            "tp_fsdp": lambda: train(TP_PP, f"{root}/tp", load=step1, data_parallel="fsdp"),
            "pp1": lambda: train(PP1, f"{root}/pp1", load=step1)}
    out = {}
    for name, run in runs.items():
        with Recorder() as recorder:
            out[name] = run()
        out[name]["posted"] = recorder.trace
    return out


def test_encoder_pipeline_parity_frozen_stages_and_resume_across_encoder_pp(tmp_path):
    runs = run_distributed(every_layout, 6, str(tmp_path), timeout_s=240)
    trained, frozen = reference(IMAGES), reference(IMAGES, frozen=True)
    check([r["pp2"] for r in runs], trained, 0, "images PP2 x DP2 -> language TP2")
    check([r["frozen"] for r in runs], frozen, 0, "frozen images PP2 x DP2 -> frozen language PP2")
    check([r["colocated"] for r in runs], trained, 0, "images PP2 x DP2 on language PP2 x DP2's ranks")
    check([r["colocated_frozen"] for r in runs], frozen, 0, "frozen images PP2 x DP2 on frozen language PP2's ranks")
    check([r["colocated_cp"] for r in runs], trained, 0, "images PP2 x DP2 on language CP2 x PP2's ranks")
    check([r["pp3"] for r in runs], _deep_reference(), 0, "a 3-block tower over PP3 (a middle stage)")
    assert {n.split(".")[3] for n in runs[3]["pp3"]["names"] if ".layers." in n} == {"1"}
    check([r["tp_fsdp"] for r in runs], trained, 1, "images TP2 x PP2 under FSDP2, resumed from PP2 x DP2")
    check([r["pp1"] for r in runs], trained, 1, "images PP1, resumed from PP2 x DP2")
    for name in runs[0]:  # NCCL pairs a (pair, group)'s messages by posting order: both ends post alike
        assert nccl_mismatches([r[name]["posted"] for r in runs]) == [], name
    # stage 0 holds the front and block 0, stage 1 block 1 (its global name) and the projection
    stage0, stage1 = set(runs[0]["pp2"]["names"]), set(runs[2]["pp2"]["names"])
    assert "encoder.embeddings.patch_embedding.weight" in stage0 and "encoder.encoder.layers.1.mlp.fc1.weight" in stage1
    assert not any(n.startswith(("projection.", "encoder.encoder.layers.1.")) for n in stage0)
    assert not any(n.startswith(("encoder.embeddings.", "encoder.encoder.layers.0.")) for n in stage1)
    # per step: one activation per micro-batch forward and, trained, one gradient back; frozen, none back, and the
    # frozen stage 0 keeps no activations (it runs under no_grad)
    for rank in range(4):
        assert runs[rank]["pp2"]["traffic"]["forward"] == MICRO, runs[rank]["pp2"]["traffic"]
        assert runs[rank]["pp2"]["traffic"]["backward"] == MICRO, runs[rank]["pp2"]["traffic"]
        assert runs[rank]["frozen"]["traffic"]["forward"] == MICRO, runs[rank]["frozen"]["traffic"]
        assert runs[rank]["frozen"]["traffic"]["backward"] == 0, runs[rank]["frozen"]["traffic"]
    assert runs[0]["frozen"]["traffic"]["saved"] == 0 and runs[0]["pp2"]["traffic"]["saved"] > 0


def whole_and_stages(build, config, bounds: tuple[int, ...]) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """An encoder and its stages over `bounds` (built by layer range, float64, initialized alike), after checking
    the stages' parameter names are the whole encoder's."""
    whole = build(config).double()
    stages = [build(config, layer_range=r).double() for r in zip(bounds, bounds[1:], strict=False)]
    for module in (whole, *stages):
        init_parameters(module, seed=3)
    names = [n for stage in stages for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in whole.named_parameters())
    return whole, stages


@pytest.mark.parametrize(("encoder", "config", "items"), [
    (ViTEncoder, ViTConfig(image_size=8, patch_size=2, hidden_size=32, num_layers=4, num_heads=4,
                           ffn_hidden_size=64), torch.randn(2, 3, 8, 8, dtype=torch.float64)),
    (AudioEncoder, AudioConfig(**{**AudioConfig.tiny().__dict__, "num_layers": 3}),
     torch.randn(2, 16, 16, dtype=torch.float64)),
])
def test_encoder_stages_compose_to_the_whole_encoder(encoder, config, items):
    """Stages built by layer range, under the whole encoder's names, run one after another give its output."""
    whole, stages = whole_and_stages(encoder, config, (0, 1, 2, config.num_layers_built))
    x = items
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, whole(items), rtol=0, atol=0)


@pytest.mark.parametrize(("world", "layout", "message"), [
    (4, {"images": {"pipeline_model_parallel_size": 2, "context_parallel_size": 2, "data_parallel_size": 1},
         "language": {"pipeline_model_parallel_size": 2, "context_parallel_size": 2, "data_parallel_size": 1}},
     r"^module 'images': context_parallel_size=2 with pipeline_model_parallel_size=2 is not supported for a "
     r"modality module"),
    (3, {"images": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                    "data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 2}},
     r"^module 'images': virtual_pipeline_model_parallel_size=2 is supported only on 'language'"),
])
def test_unsupported_encoder_pipelines_are_one_line(world, layout, message):
    with pytest.raises(LayoutError, match=message) as e:
        MimoParallelismConfig.from_dict(layout).finalize(world)
    assert "\n" not in str(e.value)


def test_an_encoder_that_cannot_split_is_refused_in_one_line():
    layout = MimoParallelismConfig.from_dict({"images": {"pipeline_model_parallel_size": 3, "data_parallel_size": 1},
                                              "language": {"data_parallel_size": 1, "rank_offset": 3}}).finalize(4)
    with pytest.raises(ProviderError, match=r"^module 'images': the encoder has 2 layers, fewer than its 3 pipeline "
                                            r"stages; use pipeline_model_parallel_size <= 2$"):
        provider(None, IMAGES).check_layout(layout)


def test_a_stacked_encoder_given_packed_items_on_a_later_stage_says_so_in_one_line():
    """A ViT stage past the first cannot size the message packed items of many sizes would need (a Qwen-VL tower
    can: `stage_input_numel`); it says so rather than failing on a missing attribute."""
    from mimo.models import ModalityBatch, ModalitySubmodule

    config = ViTConfig.tiny()
    stage = ModalitySubmodule(ViTEncoder(config, layer_range=(1, config.num_layers_built)), None)
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])
    batch = ModalityBatch(torch.zeros(12, 4), torch.tensor([2]), grids)
    with pytest.raises(ValueError, match=r"^ViTEncoder takes items of one size \(stacked\), but these items are "
                                         r"packed \(item_grids\)"):
        stage.stage_input_shape(batch)
