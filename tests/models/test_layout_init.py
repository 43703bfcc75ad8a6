"""Initialization depends on (seed, name) only: stages, meta builds, prefixes and wrappers agree."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mimo.models import (
    Decoder,
    DecoderConfig,
    ViTConfig,
    ViTEncoder,
    init_parameters,
    param_seed,
)
from tests.models.tiny import tiny_llava


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name → detached parameter."""
    return {n: p.detach() for n, p in module.named_parameters()}


def _full(cfg: DecoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameters of the whole decoder built on CPU in float64."""
    model = Decoder(cfg).double()
    init_parameters(model, seed)
    return _params(model)


def test_seed_hash_is_stable() -> None:
    """The hash is SHA-256 based, not Python's salted hash(): pinned values never change."""
    assert param_seed(0, "a") != param_seed(1, "a") != param_seed(0, "b")
    assert param_seed(0, "a") == 676882205362561491


def test_rules_ones_zeros_and_normal() -> None:
    """Norm weights are ones, biases zeros, the rest has std ≈ 0.02 and differs between parameters."""
    vit = ViTEncoder(ViTConfig.tiny())
    init_parameters(vit, seed=0)
    p = _params(vit)
    assert torch.equal(p["pre_layrnorm.weight"], torch.ones(32))
    assert torch.equal(p["encoder.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    q, k = p["encoder.layers.0.self_attn.q_proj.weight"], p["encoder.layers.0.self_attn.k_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.004 and not torch.equal(q, k)


def test_pipeline_stage_equals_slice_of_full_model() -> None:
    """Every parameter of a stage equals the same-named parameter of the full decoder, exactly."""
    cfg = DecoderConfig.tiny(num_layers=4)
    full = _full(cfg)
    for layer_range in ((0, 1), (1, 3), (3, 4)):
        stage = Decoder(cfg, layer_range).double()
        init_parameters(stage, seed=0)
        for name, value in _params(stage).items():
            assert torch.equal(value, full[name]), (layer_range, name)
    assert "layers.2.mlp.up_proj.weight" in _params(Decoder(cfg, (1, 3)))


def test_tied_head_on_last_stage_starts_as_the_embedding() -> None:
    """A last stage without the embedding owns its head, initialized to embed_tokens' value."""
    cfg = DecoderConfig.tiny(tie_embeddings=True)
    full = Decoder(cfg).double()
    init_parameters(full, seed=0)
    assert full.lm_head.weight is full.embed_tokens.weight
    assert "lm_head.weight" not in _params(full)
    last = Decoder(cfg, (1, 2)).double()
    init_parameters(last, seed=0)
    assert torch.equal(last.lm_head.weight, full.embed_tokens.weight)


def test_meta_build_equals_cpu_build() -> None:
    """Build on meta + init gives the CPU build's parameters and rotary tables, and keeps the tie."""
    cfg = DecoderConfig.tiny(tie_embeddings=True)
    cpu = Decoder(cfg).double()
    init_parameters(cpu, seed=0)
    with torch.device("meta"):
        meta = Decoder(cfg).double()
    init_parameters(meta, seed=0)
    assert meta.lm_head.weight is meta.embed_tokens.weight
    for name, value in _params(meta).items():
        assert value.device.type == "cpu" and torch.equal(value, _params(cpu)[name]), name
    assert torch.equal(meta.rope_cos, cpu.rope_cos) and torch.equal(meta.rope_sin, cpu.rope_sin)
    assert meta.rope_cos.dtype == torch.float64


def test_prefix_matches_the_submodule_inside_the_whole_model() -> None:
    """An encoder initialized alone with its prefix equals the one initialized inside MimoModel."""
    vit_alone = ViTEncoder(ViTConfig.tiny())
    init_parameters(vit_alone, seed=4, prefix="modality_submodules.images.encoder.")
    model = tiny_llava(999)
    init_parameters(model, seed=4)
    inside = _params(model.modality_submodules["images"].encoder)
    for name, value in _params(vit_alone).items():
        assert torch.equal(value, inside[name]), name


def test_activation_checkpoint_wrapper_does_not_change_values() -> None:
    """Wrapper levels (`_checkpoint_wrapped_module`) are dropped from the seeding name."""
    cfg = DecoderConfig.tiny()
    wrapped = Decoder(cfg).double()
    wrapped.layers["1"] = checkpoint_wrapper(wrapped.layers["1"])
    init_parameters(wrapped, seed=0)
    full = _full(cfg)
    name = "layers.1._checkpoint_wrapped_module.self_attn.q_proj.weight"
    assert torch.equal(_params(wrapped)[name], full["layers.1.self_attn.q_proj.weight"])
