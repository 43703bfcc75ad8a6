"""The decoder against a naive re-implementation: GQA head mapping, rotary convention, causal mask."""

from __future__ import annotations

import math

import torch

from mimo.models import Decoder, DecoderConfig, init_parameters


def _naive_attention(layer: torch.nn.Module, x: torch.Tensor, cfg: DecoderConfig) -> torch.Tensor:
    """Per-head softmax attention with explicit GQA repeat, rotate-half RoPE and a causal mask."""
    b, s, _ = x.shape
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    q = layer.q_proj(x).reshape(b, s, cfg.num_heads, d).transpose(1, 2)
    k = layer.k_proj(x).reshape(b, s, cfg.num_kv_heads, d).transpose(1, 2).repeat_interleave(group, dim=1)
    v = layer.v_proj(x).reshape(b, s, cfg.num_kv_heads, d).transpose(1, 2).repeat_interleave(group, dim=1)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()

    def rope(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return layer.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def _naive_rms(norm: torch.nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight."""
    return norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_decoder_matches_naive_reference() -> None:
    """Logits of the decoder equal a textbook Llama forward to 1e-10 in float64."""
    cfg = DecoderConfig.tiny()
    model = Decoder(cfg).double()
    init_parameters(model, seed=11)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    x = model.embed_tokens.weight[ids]
    for layer in model.layers.values():
        x = x + _naive_attention(layer.self_attn, _naive_rms(layer.input_layernorm, x, cfg.rms_norm_eps), cfg)
        h = _naive_rms(layer.post_attention_layernorm, x, cfg.rms_norm_eps)
        mlp = layer.mlp
        x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    expected = _naive_rms(model.norm, x, cfg.rms_norm_eps) @ model.lm_head.weight.T
    torch.testing.assert_close(model.logits(model(model.embed(ids))), expected, rtol=1e-10, atol=1e-12)


def test_stages_compose_to_the_full_model() -> None:
    """Stage (0, 1) then stage (1, 2), built separately with the same seed, give the full model's loss."""
    cfg = DecoderConfig.tiny(tie_embeddings=True)
    full, first, last = (Decoder(cfg, r).double() for r in (None, (0, 1), (1, 2)))
    for m in (full, first, last):
        init_parameters(m, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.roll(ids, -1, 1)
    ref_sum, ref_count = full.loss(full(full.embed(ids)), labels)
    stage_sum, stage_count = last.loss(last(first(first.embed(ids))), labels)
    assert int(ref_count) == int(stage_count) == 20
    torch.testing.assert_close(stage_sum, ref_sum, rtol=1e-12, atol=0)
