"""Qwen2.5-VL's and Qwen3-VL's language models against transformers' (reference only, tiny random models).

Our `Decoder` (q/k/v biases, or per-head q/k RMSNorm with an explicit head_dim; M-RoPE sectioned or
interleaved; DeepStack additions) is given the weights of transformers' text model by name and the same input
embeddings and 3-D positions; `get_rope_index` is compared with transformers' on batches of several images
of different grids, text-only rows and left/right padding, and packed positions with each sample's own.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration as Qwen3VL

from mimo.models.decoder import Decoder, DecoderConfig
from mimo.models.mrope import VideoGrids, frame_grids, get_rope_index, packed_rope_index
from mimo.models.rotary import MRopeLayout

IMAGE = 7  # the image token id of the tiny models
MERGE = 2  # spatial merge size
VISION = {"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 40, "intermediate_size": 16,
          "spatial_merge_size": MERGE}
TEXT = {"vocab_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 56, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
        "initializer_range": 0.3}  # large weights: attention scores, hence positions, matter
# Qwen2.5-VL: width 40 over 4 heads (head_dim 10, 5 frequencies), sectioned 1/2/2; biased q/k/v, untied head.
# Qwen3-VL: explicit head_dim 12 (6 frequencies), interleaved 2/2/2, q/k norms, tied head; 3 DeepStack layers.
FAMILIES = {
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, {"hidden_size": 40},
                   {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 2, 2]}, False),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VL, {"hidden_size": 40, "head_dim": 12},
                 {"rope_type": "default", "rope_theta": 5e3, "mrope_section": [2, 2, 2], "mrope_interleaved": True},
                 True),
}


def _hf(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random transformers model of the family, in eval mode."""
    config_cls, model_cls, text, rope, tie = FAMILIES[family]
    vision = dict(VISION, deepstack_visual_indexes=[0, 0, 0]) if family == "qwen3-vl" else VISION
    config = config_cls(text_config=dict(TEXT, **text, rope_parameters=rope), vision_config=vision,
                        image_token_id=IMAGE, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # biases and norm gains are zeros/ones at init: make them random too
        for name, param in model.model.language_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _ours(family: str, hf: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Decoder:
    """Our decoder of the same shape with the transformers model's weights, copied by name."""
    text = hf.config.text_config
    rope = text.rope_parameters
    config = DecoderConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
        ffn_hidden_size=text.intermediate_size, rms_norm_eps=text.rms_norm_eps, rope_theta=rope["rope_theta"],
        max_seq_len=text.max_position_embeddings, tie_embeddings=hf.config.tie_word_embeddings,
        kv_channels=getattr(text, "head_dim", None), qkv_bias=family == "qwen2.5-vl",
        qk_norm=family == "qwen3-vl",
        mrope=MRopeLayout(tuple(rope["mrope_section"]), rope.get("mrope_interleaved", False)))
    ours = Decoder(config).to(dtype)
    weights = {f"{name}": p for name, p in hf.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = hf.lm_head.weight
    missing = ours.load_state_dict(weights, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert ours.head_is_tied == hf.config.tie_word_embeddings
    return ours


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [3, 30] and grids: row 0 holds two images (2×4 and 6×2 patches: 2 and 3 tokens) between text, row 1
    none, row 2 one image of 4×6 patches (6 tokens) and two back-to-back at its end (2×2, 2×4)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 96, (3, 30), generator=gen)
    ids[0, 3:5] = IMAGE
    ids[0, 9:12] = IMAGE
    ids[2, 1:7] = IMAGE
    ids[2, 25:28] = IMAGE  # a 1-token image then a 2-token one, no text between
    grids = torch.tensor([[1, 2, 4], [1, 6, 2], [1, 4, 6], [1, 2, 2], [1, 2, 4]])
    return ids, grids


def _hf_rope_index(hf: torch.nn.Module, ids: torch.Tensor, grids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `get_rope_index` (its token types: 1 at image tokens)."""
    return hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grids, attention_mask=mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rope_index_matches_transformers(family: str) -> None:
    """Several images of different grids, a text-only row; unpadded, right- and left-padded."""
    hf = _hf(family)
    ids, grids = _batch()
    # transformers groups consecutive image tokens as one image: its reference takes rows 0-1 plus row 2's first
    # image (then text); our reading of row 2's back-to-back pair is checked by hand below
    ids[2, 25:28] = 50
    grids = grids[:3]
    for pad in (None, "right", "left"):
        mask = None
        if pad is not None:
            mask = torch.ones_like(ids)
            mask[0, -4:] = 0 if pad == "right" else 1
            mask[1, :5] = 0 if pad == "left" else 1
            mask[1, -5:] = 0 if pad == "right" else 1
            mask[2, :3] = 0 if pad == "left" else 1
            if pad == "left":
                ids, mask = ids.clone(), mask
                ids[2, 3:9] = IMAGE  # the image after the left padding
                ids[2, 1:3] = 11
        expected = _hf_rope_index(hf, ids, grids, mask)
        ours = get_rope_index(ids, grids, MERGE, IMAGE, mask)
        assert torch.equal(ours[0], expected[0]), pad
        assert torch.equal(ours[1], expected[1].to(ours[1].dtype)), pad


def test_rope_index_with_videos_matches_transformers() -> None:
    """Images and videos in one batch: Qwen2.5-VL's temporal step (tokens_per_second · seconds per grid), Qwen3-VL's
    frames as grids of t = 1 with timestamp text between, left padding."""
    video_id = 8
    ids = torch.randint(10, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[0, 2:4] = IMAGE  # a 2×4-patch image (2 tokens)
    ids[0, 6:14] = video_id  # a video of 2 temporal patches of 4×4 patches: 2 × 4 tokens
    ids[0, 15:23] = video_id  # another
    ids[1, 5:11] = IMAGE  # a 4×6-patch image
    images = torch.tensor([[1, 2, 4], [1, 4, 6]])
    videos = torch.tensor([[2, 4, 4], [2, 4, 4]])
    types = (ids == IMAGE).int() + 2 * (ids == video_id).int()
    hf = _hf("qwen2.5-vl")
    seconds = torch.tensor([0.5, 1.5])
    expected = hf.model.get_rope_index(ids, types, image_grid_thw=images, video_grid_thw=videos,
                                       second_per_grid_ts=seconds, attention_mask=mask)
    steps = hf.config.vision_config.tokens_per_second * seconds
    ours = get_rope_index(ids, images, MERGE, IMAGE, mask, VideoGrids(video_id, videos, steps))
    assert torch.equal(ours[0], expected[0]) and ours[0][0, 0, 10].item() > ours[0][1, 0, 10].item()
    assert torch.equal(ours[1], expected[1].to(ours[1].dtype))
    # Qwen3-VL: two videos of 2 frames of 2×1 tokens, each frame after its timestamp (text) token
    ids[0, 6:24] = 50
    for frame in (6, 9, 13, 16):
        ids[0, frame:frame + 2] = video_id
    one_frame = torch.tensor([[2, 4, 2], [2, 4, 2]])
    types = (ids == IMAGE).int() + 2 * (ids == video_id).int()
    hf = _hf("qwen3-vl")
    expected = hf.model.get_rope_index(ids, types, image_grid_thw=images, video_grid_thw=one_frame.clone(),
                                       attention_mask=mask)
    ours = get_rope_index(ids, images, MERGE, IMAGE, mask, VideoGrids(video_id, frame_grids(one_frame)))
    assert torch.equal(ours[0], expected[0])
    assert torch.equal(ours[1], expected[1].to(ours[1].dtype))


def test_back_to_back_images_and_packing() -> None:
    """Two images with no text between take their own grids; a packed row's positions equal each sample's."""
    ids, grids = _batch()
    positions, deltas = get_rope_index(ids, grids, MERGE, IMAGE)
    row = positions[:, 2, 24:29]  # text at 24, a 1×1 image, a 1×2 image, text: the image starts at p = 24 + ...
    p = int(positions[0, 2, 24]) + 1
    assert row[:, 1].tolist() == [p, p, p]
    assert row[:, 2:4].tolist() == [[p + 1, p + 1], [p + 1, p + 1], [p + 1, p + 2]]
    assert row[:, 4].tolist() == [p + 3] * 3  # after max(1, 2) = 2 positions
    assert deltas.flatten().tolist() == [0, 0, -3]  # row 2: 6 tokens over 3 positions
    # pack the three samples, each cut at a different length, into one row with a padding tail document
    lengths = [20, 30, 28]
    row_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)] + [torch.zeros(5, dtype=torch.long)])
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, 5])])
    packed = packed_rope_index(row_ids[None], docs[None], grids, MERGE, IMAGE)
    start = 0
    for i, n in enumerate(lengths):
        alone = get_rope_index(ids[i:i + 1, :n], grids[[[0, 1], [], [2, 3, 4]][i]].reshape(-1, 3), MERGE, IMAGE)[0]
        assert torch.equal(packed[:, 0, start:start + n], alone[:, 0]), i
        start += n
    assert packed[:, 0, start:].tolist() == [list(range(5))] * 3
    with pytest.raises(ValueError, match="image_grid_thw has 5 image"):
        get_rope_index(ids[:2], grids, MERGE, IMAGE)


def _inputs(hf: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random input embeddings [3, 30, H], the batch's 3-D positions and its image mask."""
    ids, grids = _batch()
    positions, _ = get_rope_index(ids, grids, MERGE, IMAGE)
    embeds = torch.randn(*ids.shape, hf.config.text_config.hidden_size, dtype=dtype,
                         generator=torch.Generator().manual_seed(1))
    return embeds, positions, ids == IMAGE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_language_model_matches_transformers(family: str) -> None:
    """Hidden states and logits equal transformers' text model's to 1e-5 in float32 (3-D positions)."""
    hf = _hf(family)
    ours = _ours(family, hf)
    embeds, positions, _ = _inputs(hf, torch.float32)
    with torch.no_grad():
        expected = hf.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        hidden = ours(embeds, position_ids=positions)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.logits(hidden), hf.lm_head(expected), rtol=1e-5, atol=1e-5)


def test_packed_row_equals_each_sample() -> None:
    """Qwen3-VL shapes: three samples packed in one row (3-D positions per document, attention per document)
    give each sample's unpacked hidden states."""
    hf = _hf("qwen3-vl")
    ours = _ours("qwen3-vl", hf)
    embeds, positions, _ = _inputs(hf, torch.float32)
    ids, grids = _batch()
    lengths = [20, 30, 28]
    row = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed_positions = packed_rope_index(row, docs, grids, MERGE, IMAGE)
    with torch.no_grad():
        packed = ours(torch.cat([embeds[i, :n] for i, n in enumerate(lengths)])[None],
                      position_ids=packed_positions, document_ids=docs)
        start = 0
        for i, n in enumerate(lengths):
            alone = ours(embeds[i:i + 1, :n], position_ids=positions[:, i:i + 1, :n])
            torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_deepstack_matches_transformers() -> None:
    """Qwen3-VL's DeepStack: visual embeddings added at the image positions after layers 0-2 (a mask for two,
    flat indices for one), as transformers' `_deepstack_process`."""
    hf = _hf("qwen3-vl")
    ours = _ours("qwen3-vl", hf)
    embeds, positions, mask = _inputs(hf, torch.float32)
    gen = torch.Generator().manual_seed(2)
    stack = [torch.randn(int(mask.sum()), embeds.shape[-1], generator=gen) for _ in range(3)]
    flat = mask.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        expected = hf.model.language_model(inputs_embeds=embeds, position_ids=positions, visual_pos_masks=mask,
                                           deepstack_visual_embeds=stack).last_hidden_state
        hidden = ours(embeds, position_ids=positions,
                      added_after_layer={0: (mask, stack[0]), 1: (flat, stack[1]), 2: (mask, stack[2])})
        plain = ours(embeds, position_ids=positions)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the additions matter


def _float64_rotary(rotary: torch.nn.Module, head_dim: int, theta: float) -> None:
    """Make transformers' M-RoPE angles float64 (its forward casts them to float32) with its own layout code
    (`recomposition_frequencies`), so a float64 comparison is not bounded by float32 tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.expand(3, -1, -1)[..., None].double() * inv_freq
        return rotary.recomposition_frequencies(angles.cos()), rotary.recomposition_frequencies(angles.sin())

    rotary.forward = forward


def _float64_norms(model: torch.nn.Module) -> None:
    """transformers' RMSNorms normalise in float32 whatever the input: the same formula, kept in float64."""
    for norm in (m for m in model.modules() if type(m).__name__.endswith("RMSNorm")):
        eps = norm.variance_epsilon
        norm.forward = lambda x, n=norm, e=eps: n.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e)


def test_mrope_gradients_float64(family: str = "qwen3-vl") -> None:
    """Float64 gradients of the input embeddings and every weight through interleaved M-RoPE and the q/k norms equal
    transformers' to 1e-10; its rotary angles and RMSNorms (float32 inside, whatever the input) made float64."""
    hf = _hf(family, torch.float64)
    ours = _ours(family, hf, torch.float64)
    ours.reset_buffers()
    _float64_rotary(hf.model.language_model.rotary_emb, ours.config.head_dim, ours.config.rope_theta)
    _float64_norms(hf.model.language_model)
    embeds, positions, _ = _inputs(hf, torch.float64)
    weights = torch.randn(*embeds.shape[:2], hf.config.text_config.vocab_size, dtype=torch.float64)
    grads = []
    for run in (lambda x: hf.lm_head(hf.model.language_model(inputs_embeds=x, position_ids=positions)[0]),
                lambda x: ours.logits(ours(x, position_ids=positions))):
        x = embeds.clone().requires_grad_()
        (run(x) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)
    for name, param in ours.named_parameters():
        reference = hf.lm_head.weight if name == "lm_head.weight" else \
            hf.model.language_model.get_parameter(name)
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_two_dimensional_positions_under_mrope_are_plain_rotary() -> None:
    """[B, S] positions on an M-RoPE decoder take the 1-D path, equal to [3, B, S] with three equal rows; a 3-D
    position tensor on a decoder without a layout is refused."""
    cfg = DecoderConfig.tiny(mrope=MRopeLayout((2, 3, 3), interleaved=True), qk_norm=True)
    model = Decoder(cfg)
    hidden = torch.randn(2, 9, cfg.hidden_size)
    positions = torch.arange(9).expand(2, -1)
    flat = model(hidden, position_ids=positions)
    torch.testing.assert_close(model(hidden, position_ids=positions.expand(3, -1, -1)), flat, rtol=0, atol=0)
    torch.testing.assert_close(model(hidden), flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no mrope layout"):
        Decoder(DecoderConfig.tiny())(hidden, position_ids=positions.expand(3, -1, -1))
    with pytest.raises(ValueError, match="mrope_section"):
        DecoderConfig.tiny(mrope=MRopeLayout((2, 3, 2)))
