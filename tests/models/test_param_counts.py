"""Closed-form parameter counts equal counted parameters; the big presets have their expected size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mimo.models import AudioConfig, AudioEncoder, Decoder, DecoderConfig, ViTConfig, ViTEncoder


def _count(module: torch.nn.Module) -> int:
    """Number of parameter elements, a shared (tied) parameter counted once."""
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layer_range", [None, (0, 1), (1, 3), (2, 4), (0, 4)])
def test_decoder_formula_tiny(tie: bool, layer_range: tuple[int, int] | None) -> None:
    """Whole model and every kind of stage, tied or not."""
    cfg = DecoderConfig.tiny(num_layers=4, tie_embeddings=tie)
    assert _count(Decoder(cfg, layer_range)) == cfg.num_params(layer_range)


@pytest.mark.parametrize("layer_range", [None, (1, 3)])
def test_decoder_formula_qwen_shapes(layer_range: tuple[int, int] | None) -> None:
    """Qwen2 q/k/v biases and Qwen3 q/k head norms with an explicit head_dim are counted."""
    cfg = DecoderConfig.tiny(num_layers=3, kv_channels=24, qkv_bias=True, qk_norm=True)
    assert _count(Decoder(cfg, layer_range)) == cfg.num_params(layer_range)


@pytest.mark.parametrize("select_layer", [-1, -2, 0, 2])
@pytest.mark.parametrize("drop_class_token", [True, False])
def test_vit_formula_tiny(select_layer: int, drop_class_token: bool) -> None:
    """Only the layers up to `select_layer` are built and counted."""
    cfg = dataclasses.replace(ViTConfig.tiny(), select_layer=select_layer, drop_class_token=drop_class_token)
    vit = ViTEncoder(cfg)
    assert _count(vit) == cfg.num_params()
    out = vit(torch.zeros(2, 3, 8, 8))
    assert out.shape == (2, cfg.tokens_per_image, 32) and cfg.tokens_per_image == 16 + (not drop_class_token)


def test_audio_formula_and_tokens() -> None:
    """16 frames → 8 tokens; the formula counts the conv stem, positions, blocks and final norm."""
    cfg = AudioConfig.tiny()
    enc = AudioEncoder(cfg)
    assert _count(enc) == cfg.num_params()
    assert enc(torch.zeros(3, 16, 16)).shape == (3, cfg.tokens_per_item, 32) and cfg.tokens_per_item == 8
    with pytest.raises(ValueError, match="expected log-mel features"):
        enc(torch.zeros(3, 16, 15))


@pytest.mark.parametrize(("name", "low", "high"), [("1b", 1.2e9, 1.4e9), ("3b", 3.0e9, 3.3e9),
                                                   ("7b", 6.7e9, 6.8e9)])
def test_decoder_presets_on_meta(name: str, low: float, high: float) -> None:
    """Built on the meta device (no memory): counted = formula; 7b is Vicuna-7B's 6.74 B."""
    cfg = DecoderConfig.preset(name)
    with torch.device("meta"):
        count = _count(Decoder(cfg))
    print(f"decoder {name}: {count:,} parameters")
    assert count == cfg.num_params() and low < count < high


def test_clip_vit_l14_336_on_meta() -> None:
    """576 tokens; 0.29 B built for the penultimate layer (LLaVA), 0.30 B with all 24 layers."""
    cfg = ViTConfig.clip_vit_l14_336()
    assert cfg.tokens_per_image == 576
    for select_layer, low, high in ((-2, 0.29e9, 0.292e9), (-1, 0.303e9, 0.304e9)):
        c = dataclasses.replace(cfg, select_layer=select_layer)
        with torch.device("meta"):
            count = _count(ViTEncoder(c))
        print(f"CLIP ViT-L/14-336 select_layer={select_layer}: {count:,} parameters")
        assert count == c.num_params() and low < count < high
