"""Activation recomputation (`recompute_granularity: full`): the blocks really run again in the backward and
keep less for it; bad settings are refused by name. Parity with the reference on every kind of wrapping is
in tests/training/test_parity.py (rows `*-recompute*`)."""

from __future__ import annotations

import re

import pytest
import torch

from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError
from mimo.testing import run_distributed
from mimo.training.run_config import RunConfigError, parse_run_config
from mimo.training.step import MimoTrainer
from tests.training.test_parity import batches, provider

MLP = re.compile(r"layers\.(\d+)\.mlp$")  # an inner module: its pre-hooks fire in the
# recomputation too (which stops once it has what the backward needs, before the MLP returns)


def calls_and_saved(rank: int, world_size: int, wrap: dict) -> tuple[dict[str, list[int]], int]:
    """`calls_and_saved_with` every module wrapped with the settings `wrap`."""
    return calls_and_saved_with(rank, world_size, DistributedConfig(ModuleDistributedConfig(**wrap)))


def calls_and_saved_with(rank: int, world_size: int, wrap: DistributedConfig) -> tuple[dict[str, list[int]], int]:
    """One step of 2 micro-batches on homogeneous DP2: how often each block's MLP ran, per module, and the
    bytes autograd kept for the backward over the whole step (recomputed blocks keep only their inputs)."""
    prov = provider({"images": {}, "language": {}}, ("images",))
    model = prov.provide_distributed_model(wrap)
    calls: dict[str, list[int]] = {}
    for name, module in [("images", model.modality_submodules["images"]), ("language", model.language_model)]:
        mlps = sorted(((int(m.group(1)), mod) for n, mod in module.named_modules() if (m := MLP.search(n))),
                      key=lambda item: item[0])
        calls[name] = [0] * len(mlps)
        for i, mlp in mlps:
            mlp.register_forward_pre_hook(lambda *_, name=name, i=i: calls[name].__setitem__(i, calls[name][i] + 1))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=8, num_microbatches=2,
                          activation_dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step(batches(("images",))[0])
    return calls, saved[0]


def test_recomputed_blocks_run_again_in_the_backward_and_keep_less():
    plain, kept = run_distributed(calls_and_saved, 2, {})[0]
    full, kept_full = run_distributed(calls_and_saved, 2, {"recompute_granularity": "full"})[0]
    first, kept_first = run_distributed(calls_and_saved, 2, {"recompute_granularity": "full",
                                                             "recompute_num_layers": 1})[0]
    for name, counts in plain.items():
        assert len(counts) >= 2 and set(counts) == {2}, (name, counts)  # once per micro-batch
        assert full[name] == [4] * len(counts), (name, full[name])  # and again in each backward
        assert first[name] == [4] + [2] * (len(counts) - 1), (name, first[name])  # only the first block
    assert kept_full < kept_first < kept, (kept_full, kept_first, kept)


@pytest.mark.parametrize(("wrap", "message"), [
    ({"recompute_granularity": "partial"}, "recompute_granularity must be 'none' or 'full', got 'partial'"),
    ({"recompute_granularity": "full", "recompute_num_layers": 0}, "recompute_num_layers must be at least 1"),
    ({"recompute_num_layers": 2}, "module 'default': recompute_num_layers 2 needs recompute_granularity 'full' (it "
                                  "picks which blocks recompute)"),
])
def test_bad_module_settings_are_refused(wrap, message):
    with pytest.raises(WrapError, match=re.escape(message)):
        DistributedConfig(ModuleDistributedConfig(**wrap)).check(["images", "language"])


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"recompute_num_layers": 2}},
     "train: recompute_num_layers 2 needs recompute_granularity 'full' (it picks which blocks recompute)"),
    ({"distributed": {"images": {"recompute_num_layers": 2}}},  # train's granularity: none
     "distributed.images: recompute_num_layers 2 needs recompute_granularity 'full' (it picks which blocks "
     "recompute)"),
])
def test_num_layers_without_recomputation_is_refused(sections, message):
    with pytest.raises(RunConfigError) as e:
        parse_run_config({"parallelism": {"images": {}, "language": {}}, **sections})
    assert str(e.value) == message


def test_the_train_section_reaches_every_module():
    config = parse_run_config({"parallelism": {"images": {}, "language": {}},
                               "distributed": {"language": {"data_parallel": "fsdp"}},
                               "train": {"recompute_granularity": "full", "recompute_num_layers": 3}})
    wrap = config.distributed_config
    for cfg in (wrap.default, wrap.for_module("language")):
        assert (cfg.recompute_granularity, cfg.recompute_num_layers) == ("full", 3)
    assert wrap.for_module("language").data_parallel == "fsdp"


def test_a_bad_granularity_in_the_yaml_names_the_choices():
    with pytest.raises(RunConfigError, match=re.escape("train.recompute_granularity: 'selective' is not allowed; "
                                                       "choose one of ['none', 'full']")):
        parse_run_config({"parallelism": {"images": {}, "language": {}},
                          "train": {"recompute_granularity": "selective"}})


def test_a_module_may_set_its_own_compile_and_recomputation():
    """`distributed.<module>` overrides train's run-wide defaults for that module only: here the encoder opts out of
    recomputation (its own granularity brings its own recompute_num_layers, null) and compiles alone, and the
    language model keeps train's granularity with fewer blocks."""
    config = parse_run_config({"parallelism": {"images": {}, "language": {}},
                               "distributed": {"images": {"recompute_granularity": "none", "compile": True},
                                               "language": {"recompute_num_layers": 1}},
                               "train": {"recompute_granularity": "full", "recompute_num_layers": 3}})
    wrap = config.distributed_config
    images, language = wrap.for_module("images"), wrap.for_module("language")
    assert (images.compile, images.recompute_granularity, images.recompute_num_layers) == (True, "none", None)
    assert (language.compile, language.recompute_granularity, language.recompute_num_layers) == (False, "full", 1)
    assert (wrap.default.recompute_granularity, wrap.default.recompute_num_layers) == ("full", 3)
    assert config.to_dict()["distributed"] == {"images": {"recompute_granularity": "none", "compile": True},
                                               "language": {"recompute_num_layers": 1}}  # as written, no dtype


def test_an_opted_out_module_runs_its_blocks_once():
    """A module whose settings say none does not recompute while the other does (one step, homogeneous DP2)."""
    wrap = DistributedConfig(ModuleDistributedConfig(recompute_granularity="full"),
                             {"images": ModuleDistributedConfig(recompute_granularity="none")})
    calls, _ = run_distributed(calls_and_saved_with, 2, wrap)[0]
    assert set(calls["images"]) == {2} and set(calls["language"]) == {4}, calls


def test_compile_and_recomputation_reach_a_qwen_towers_blocks():
    """The Qwen-VL towers keep Hugging Face's `blocks.N` names: `recompute_granularity: full` wraps those blocks as
    it wraps `layers.N` ones (each block's MLP runs again in the backward), and `compile` finds the same blocks."""
    from mimo.distributed import _blocks, recompute
    from mimo.models import ModalitySubmodule
    from mimo.models.qwen_vision import JoinDeepStack, Qwen25VisionConfig, Qwen25VisionTower

    config = Qwen25VisionConfig.tiny()
    images = ModalitySubmodule(Qwen25VisionTower(config), JoinDeepStack())
    assert _blocks(images) == list(images.encoder.blocks.values())  # what compile_blocks, recompute and FSDP2 take
    recompute(images, tp=1, num_layers=None)
    calls = [0] * config.depth
    for i, block in enumerate(images.encoder.blocks.values()):
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    grid = torch.tensor([[1, 4, 6], [1, 8, 4]])
    images(torch.randn(int(grid.prod(1).sum()), config.patch_dim), grid).square().sum().backward()
    assert calls == [2] * config.depth, calls
