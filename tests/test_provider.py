"""The model provider: each rank builds exactly what it hosts, with the single-process model's values."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import mimo.grid
from mimo.config import MimoParallelismConfig
from mimo.families.llava import LlavaMimoProvider
from mimo.models import (
    AudioConfig,
    AudioEncoder,
    Decoder,
    DecoderConfig,
    MimoModel,
    MimoStubModel,
    MLPProjector,
    ModalityBatch,
    ModalitySubmodule,
    ViTConfig,
    ViTEncoder,
)
from mimo.provider import (
    MimoModelProvider,
    ModuleSpec,
    ProviderError,
    pipeline_chunk_ranges,
    pipeline_layer_range,
)
from mimo.testing import fake_world, run_distributed
from tests.test_grid import COLOCATED, HETEROGENEOUS, HOMOGENEOUS, STUB

DECODER = DecoderConfig.tiny(num_layers=3)
TOKENS = {"images": 300, "audio": 301}


def modality_spec(name: str) -> ModuleSpec:
    """A tiny encoder + MLP projector for 'images' or 'audio'."""
    if name == "images":
        cfg = ViTConfig.tiny()
        encoder = ModuleSpec(ViTEncoder, {"config": cfg})
    else:
        cfg = AudioConfig.tiny()
        encoder = ModuleSpec(AudioEncoder, {"config": cfg})
    projection = ModuleSpec(MLPProjector, {"in_features": cfg.hidden_size, "out_features": DECODER.hidden_size})
    return ModuleSpec(ModalitySubmodule, submodules={"encoder": encoder, "projection": projection})


def make_provider(layout: dict | None, modalities=("images",), **kwargs) -> MimoModelProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return MimoModelProvider(
        language_model_spec=ModuleSpec(Decoder, {"config": DECODER}),
        modality_submodules_spec={m: modality_spec(m) for m in modalities},
        special_token_ids={m: TOKENS[m] for m in modalities},
        mimo_parallelism_config=config,
        **kwargs,
    )


def modalities_of(layout: dict) -> tuple[str, ...]:
    return tuple(m for m in layout if m != "language")


def provide_on_rank(rank: int, world_size: int, layout: dict) -> dict:
    """Provide on this rank; compare every parameter to the single-process model; report what is held."""
    mods = modalities_of(layout)
    kwargs = {"freeze_language_model": True, "freeze_modality_encoders": {mods[0]: True},
              "params_dtype": torch.float64, "seed": 7}
    provider = make_provider(layout, mods, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = provider.provide()
    infra = provider.build_infra()
    created = []
    real = mimo.grid._new_group
    mimo.grid._new_group = lambda ranks: created.append(ranks) or real(ranks)
    assert provider.build_infra() is infra and provider.provide() is not None
    mimo.grid._new_group = real
    assert created == [], "a second provide() created process groups again"

    if isinstance(model, MimoStubModel):
        assert infra.is_stub_rank and infra.participating_modules == []
        assert list(model.parameters()) == []
        return {"stub": True}
    reference = dict(make_provider(None, mods, **kwargs).provide().named_parameters())
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.dtype == torch.float64, name
        assert torch.equal(p, reference[name]), f"{name} differs from the single-process model"
        frozen = name.startswith("language_model.") or name.startswith(f"modality_submodules.{mods[0]}.encoder.")
        assert p.requires_grad == (not frozen), name
    layers = sorted({int(n.split(".")[2]) for n in params if n.startswith("language_model.layers.")})
    return {
        "stub": False,
        "modules": infra.participating_modules,
        "modalities": sorted(model.modality_submodules),
        "language": model.language_model is not None,
        "layers": layers,
        "embedding": "language_model.embed_tokens.weight" in params,
        "head": "language_model.lm_head.weight" in params,
        "deployment": infra.deployment,
        "pg_tp": {n: pg.tp and dist.get_process_group_ranks(pg.tp) for n, pg in infra.pg_collections.items()},
    }


@pytest.mark.parametrize(("kind", "layout", "world_size"),
                         [("homogeneous", HOMOGENEOUS, 4), ("colocated", COLOCATED, 4),
                          ("heterogeneous", HETEROGENEOUS, 8), ("stub", STUB, 4)],
                         ids=["homogeneous", "colocated", "heterogeneous", "stub"])
def test_each_rank_hosts_exactly_its_modules(kind, layout, world_size):
    results = run_distributed(provide_on_rank, world_size, layout)
    config = MimoParallelismConfig.from_dict(layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.finalize(world_size)
    for rank, res in enumerate(results):
        hosted = config.modules_on_rank(rank)
        if not hosted:
            assert res == {"stub": True}
            continue
        assert res["modules"] == hosted
        assert res["modalities"] == sorted(m for m in hosted if m != "language")
        assert res["language"] == ("language" in hosted)
        assert res["deployment"] == kind if kind != "stub" else res["deployment"] == "heterogeneous"
    if kind == "heterogeneous":  # language TP 2 x PP 2 on ranks 2-5: 3 layers split 2 + 1
        assert [results[r]["layers"] for r in range(2, 6)] == [[0, 1], [0, 1], [2], [2]]
        assert [results[r]["embedding"] for r in range(2, 6)] == [True, True, False, False]
        assert [results[r]["head"] for r in range(2, 6)] == [False, False, True, True]
        assert results[3]["pg_tp"] == {"images": None, "language": [2, 3], "audio": None}
    if kind == "homogeneous":
        assert all(r["layers"] == [0, 1, 2] and r["embedding"] and r["head"] for r in results)


def test_single_process_build_and_dtype():
    provider = make_provider(None, ("images", "audio"), params_dtype=torch.bfloat16,
                             freeze_modality_projections={"audio": True})
    model = provider.provide()
    assert isinstance(model, MimoModel)
    assert provider.build_infra().participating_modules == ["images", "audio", "language"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.modality_submodules["audio"].projection.parameters())
    assert all(p.requires_grad for p in model.modality_submodules["images"].parameters())


def test_pipeline_layer_ranges():
    assert [pipeline_layer_range(24, 4, r) for r in range(4)] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert [pipeline_layer_range(26, 4, r) for r in range(4)] == [(0, 7), (7, 14), (14, 20), (20, 26)]
    with pytest.raises(ProviderError, match="has 2 layers, fewer than its 4 pipeline stages"):
        pipeline_layer_range(2, 4, 0)
    with pytest.raises(ProviderError, match=r"3 layers, fewer than its 4 virtual pipeline stages .*PP x VPP <= 3"):
        pipeline_chunk_ranges(3, 2, 0, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"special_token_ids": {}}, r"modalities \['images'\] have no special_token_ids entry"),
        ({"freeze_modality_encoders": {"video": True}},
         r"freeze_modality_encoders names unknown modalities \['video'\]"),
        ({"freeze_modality_projections": {"x": True}}, r"freeze_modality_projections names unknown modalities"),
        ({"mimo_parallelism_config": MimoParallelismConfig.from_dict({"language": {}})},
         r"no layout for \['images'\]; the model's modules are \['images', 'language'\]"),
    ],
)
def test_provider_errors(kwargs, message):
    base = {"language_model_spec": ModuleSpec(Decoder, {"config": DECODER}),
            "modality_submodules_spec": {"images": modality_spec("images")},
            "special_token_ids": {"images": 300}}
    base.update(kwargs)
    with pytest.raises(ProviderError, match=message):
        MimoModelProvider(**base)


def test_layout_needs_an_initialized_world():
    provider = make_provider({"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}})
    with pytest.raises(ProviderError, match="needs torch.distributed to be initialized"):
        provider.build_infra()


def test_llava_preset_errors():
    with pytest.raises(ProviderError,
                       match=r"unknown LLaVA preset '13b'; presets are \['tiny', '1b', '3b', '7b', 'llava-1.5-7b'\]"):
        LlavaMimoProvider.preset("13b")
    with pytest.raises(ProviderError, match=r"unknown override\(s\) \['layers'\]"):
        LlavaMimoProvider.preset("tiny", layers=3)


@pytest.mark.parametrize("kwargs, encoder, projection", [
    ({"freeze_modality_encoders": {"images": True}}, False, True),
    ({"freeze_modality_projections": {"images": True}}, True, False),
    ({"freeze_vision_encoder": True, "freeze_modality_projections": {"images": False}}, False, True),
    ({"freeze_projection": True, "freeze_modality_encoders": {"images": True}}, False, False),
])
def test_llava_takes_the_base_providers_freezing_arguments(kwargs, encoder, projection):
    """Megatron-Bridge's LlavaMimoProvider is a MimoModelProvider: its per-modality flags work here too,
    in the constructor and in `preset`; a part is frozen if either argument says so."""
    for provider in (LlavaMimoProvider.preset("tiny", **kwargs),
                     LlavaMimoProvider(ViTConfig.tiny(), DecoderConfig.tiny(), **kwargs)):
        images = provider.provide().modality_submodules["images"]
        assert all(p.requires_grad == encoder for p in images.encoder.parameters()), kwargs
        assert all(p.requires_grad == projection for p in images.projection.parameters()), kwargs
    with pytest.raises(ProviderError, match=r"freeze_modality_encoders names unknown modalities \['audio'\]"):
        LlavaMimoProvider.preset("tiny", freeze_modality_encoders={"audio": True})


@pytest.mark.parametrize("name", ["tiny", "1b", "3b", "7b"])
def test_llava_preset_parameter_counts_on_meta(name):
    provider = LlavaMimoProvider.preset(name)
    model = provider.build_meta_model()
    images = model.modality_submodules["images"]
    counted = {
        "vision_encoder": sum(p.numel() for p in images.encoder.parameters()),
        "projection": sum(p.numel() for p in images.projection.parameters()),
        "language_model": sum(p.numel() for p in model.language_model.parameters()),
    }
    assert counted == provider.num_params()
    print(f"\nLLaVA {name}: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in counted.items()))
    if name == "7b":
        assert 6.70e9 < counted["language_model"] < 6.76e9      # Vicuna-7B: 6.74 B
        assert 0.28e9 < counted["vision_encoder"] < 0.31e9      # CLIP ViT-L/14-336 without its unused last layer


def test_llava_tiny_trains_one_step_single_process():
    provider = LlavaMimoProvider.preset("tiny", params_dtype=torch.float64)
    model = provider.provide()
    cfg = provider.vision_config
    ids = torch.randint(0, provider.language_config.vocab_size, (2, 40))
    ids[0, 2:2 + cfg.tokens_per_image] = provider.image_token_id
    batch = {"images": ModalityBatch(torch.randn(1, 3, cfg.image_size, cfg.image_size, dtype=torch.float64),
                                     torch.tensor([1, 0]))}
    loss_sum, count = model(ids, ids.roll(-1, 1), batch)
    (loss_sum / count).backward()
    # every position has a label except the image positions and the one whose target is an image token
    assert torch.isfinite(loss_sum) and count == 2 * 40 - cfg.tokens_per_image - 1
    assert all(p.grad is not None for p in model.parameters())


TWO_EDGES = {"images": {"data_parallel_size": 1}, "audio": {"data_parallel_size": 1, "rank_offset": 1},
             "language": {"data_parallel_size": 1, "rank_offset": 2}}


@pytest.mark.parametrize("rank, hosted", [(0, ["images"]), (2, ["language"])])
def test_infra_derives_what_it_can_and_leaves_the_callers_layout_alone(rank, hosted):
    """The provider's topology reaches the infra without being written into the caller's config."""
    topology = {"audio": ["language"], "images": ["language"]}  # the layout's order is images, audio
    provider = make_provider(TWO_EDGES, ("images", "audio"), topology=topology)
    with fake_world(rank, 3):
        infra = provider.build_infra()
    assert provider.mimo_parallelism_config.topology is None
    assert infra.topology == topology and infra.config.edges == [("audio", "language"), ("images", "language")]
    assert infra.participating_modules == hosted and not infra.is_stub_rank
    assert infra.deployment == "heterogeneous" and sorted(infra.pg_collections) == ["audio", "images", "language"]
    same = make_provider(TWO_EDGES, ("images", "audio"))  # the default topology: the caller's config itself
    with fake_world(rank, 3):
        assert same.build_infra().config is same.mimo_parallelism_config
