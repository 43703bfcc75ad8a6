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


def test_the_head_on_the_scored_positions_alone_gives_the_same_loss_and_gradients() -> None:
    """`scored_positions` (a superset of the labelled positions, as `LanguageText` finds them) changes neither
    the loss nor any gradient; with no position at all the loss is 0 and every weight still gets a gradient."""
    from mimo.data.packing import scored_positions
    from mimo.models.labels import IGNORE_INDEX

    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.tiny()).double()
    init_parameters(decoder, seed=3)
    ids = torch.randint(1, decoder.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # the prompt
    superset = scored_positions(labels)
    labels[1, 9] = IGNORE_INDEX  # ignored later (a modality position): still in the superset
    runs = []
    for scored in (None, superset):
        decoder.zero_grad()
        loss, count = decoder(input_ids=ids, labels=labels, scored_positions=scored)
        loss.backward()
        runs.append((loss.detach(), int(count), {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    (full, n_full, g_full), (part, n_part, g_part) = runs
    torch.testing.assert_close(part, full, rtol=1e-12, atol=0)
    assert n_part == n_full == 9
    for name, grad in g_full.items():
        torch.testing.assert_close(g_part[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    decoder.zero_grad()
    loss, _ = decoder(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX),
                      scored_positions=torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and all(p.grad is not None for p in decoder.parameters())
