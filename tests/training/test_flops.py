"""FLOP formulas: hand counts for the tiny shapes, and `FlopCounterMode` measurements of real passes.

The measurements run SDPA on its math backend, which decomposes attention into matmuls the counter
sees; they then agree with the formulas exactly (tolerance 0: both are integer counts of the same
matmuls). On CPU the default SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no entry
in the counter's registry, so there it measures the dense part only; one test pins that difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mimo.data import MimoBatch
from mimo.families.llava import LLAVA, LlavaMimoProvider
from mimo.flops import (
    ModalityFlops,
    PackedRows,
    attention_flops,
    audio_flops,
    batch_flops,
    decoder_flops,
    decoder_matmul_weights,
    matmul_flops,
    mimo_step_flops,
    mimo_step_flops_by_module,
    packed_decoder_flops,
    projector_flops,
    vit_flops,
)
from mimo.models import (
    AudioConfig,
    AudioEncoder,
    Decoder,
    DecoderConfig,
    MLPProjector,
    ModalityBatch,
    ViTConfig,
    ViTEncoder,
)
from mimo.training.loop import packed_rows
from mimo.training.step import StepResult


def measure(fn: Callable[[], None], math_sdpa: bool = True) -> int:
    """FLOPs `FlopCounterMode` counts while `fn` runs (SDPA on the math backend unless told otherwise)."""
    backend = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def linear_weights(module: torch.nn.Module) -> int:
    """Matmul weights counted from the module's nn.Linear shapes."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_decoder_formula_by_hand() -> None:
    """Tiny decoder: per layer q,o 64×64, k,v 64×32, gate,up,down 64×128; head 64×256."""
    cfg = DecoderConfig.tiny()
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert per_layer == 36864
    weights = 2 * per_layer + 64 * 256
    assert decoder_matmul_weights(cfg) == weights == linear_weights(Decoder(cfg)) == 90112
    batch, seq = 2, 12
    dense = 6 * weights * batch * seq
    attention = 12 * seq * seq * 64 * 2 * batch  # 12·S²·h per layer per sequence
    assert decoder_flops(cfg, batch, seq) == dense + attention == 13_418_496
    assert decoder_flops(cfg, batch, seq, trainable=False, input_grad=True) == 4 * weights * batch * seq + attention
    assert decoder_flops(cfg, batch, seq, trainable=False) == 2 * weights * batch * seq + attention // 3
    assert decoder_flops(cfg, batch, seq, causal_half=True) == dense + attention * (seq + 1) // (2 * seq)


def test_packed_rows_count_each_document_and_the_computed_positions() -> None:
    """Packed: two documents of 20 and 12 cost what they cost as separate sequences (attention stays within
    each), and a row's 8-position rounding tail adds its matmuls only; never the padded batch's [2, 20]."""
    cfg = DecoderConfig.tiny()
    documents = packed_decoder_flops(cfg, 32, [20, 12])
    assert documents == decoder_flops(cfg, 1, 20) + decoder_flops(cfg, 1, 12)
    assert packed_decoder_flops(cfg, 40, [20, 12]) == documents + matmul_flops(decoder_matmul_weights(cfg), 8)
    assert documents < decoder_flops(cfg, 2, 20)
    frozen = packed_decoder_flops(cfg, 32, [20, 12], trainable=False, input_grad=True)
    assert frozen == decoder_flops(cfg, 1, 20, trainable=False, input_grad=True) + decoder_flops(
        cfg, 1, 12, trainable=False, input_grad=True)


@pytest.mark.parametrize("documents", [None, (20, 12)], ids=["padded", "packed"])
def test_the_loop_counts_packed_rows_from_the_step_result(documents) -> None:
    """`mimo train` takes the packed rows for the FLOP count from what the step reported, not from the config."""
    result = StepResult(loss=1.0, label_tokens=30, tokens=32, positions=40, grad_norm=1.0, lr=1e-4,
                        documents=documents)
    assert packed_rows(result) == (None if documents is None else PackedRows(40, (20, 12)))


def test_tied_head_still_counts() -> None:
    """A tied head shares its weight with the embedding, but it is still a matmul."""
    assert decoder_matmul_weights(DecoderConfig.tiny(tie_embeddings=True)) == 90112


@pytest.mark.parametrize("mode", ["train", "frozen_passthrough", "forward"])
def test_decoder_matches_flop_counter(mode: str) -> None:
    """One forward(+backward) of the tiny decoder: measured = formula, in each gradient mode."""
    torch.manual_seed(0)
    cfg = DecoderConfig.tiny()
    model = Decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    if mode == "train":
        measured = measure(lambda: model(input_ids=ids, labels=ids)[0].backward())
    elif mode == "frozen_passthrough":
        model.requires_grad_(False)
        hidden = torch.randn(3, 20, cfg.hidden_size, requires_grad=True)
        measured = measure(lambda: model(hidden, labels=ids)[0].backward())
    else:
        measured = _no_grad(model, ids)
    expected = decoder_flops(cfg, 3, 20, trainable=mode == "train", input_grad=mode == "frozen_passthrough")
    assert measured == expected


def _no_grad(model: Decoder, ids: torch.Tensor) -> int:
    """FLOPs of a forward under no_grad."""
    with torch.no_grad():
        return measure(lambda: model(input_ids=ids, labels=ids))


@pytest.mark.parametrize("trainable", [True, False])
def test_vit_matches_flop_counter(trainable: bool) -> None:
    """Tiny ViT (2 built layers over 16 patches + class token): measured = formula, trained or frozen."""
    cfg = ViTConfig.tiny()
    vit = ViTEncoder(cfg).requires_grad_(trainable)
    pixels = torch.randn(5, 3, 8, 8)
    measured = measure(lambda: vit(pixels).sum().backward()) if trainable else _forward(vit, pixels)
    assert measured == vit_flops(cfg, 5, trainable=trainable)
    # By hand: blocks 2·(4·32² + 2·32·64) weights over 17 tokens; the patch conv 3·2²·32 over 16 (no input grad).
    blocks, patch = 2 * (4 * 32 * 32 + 2 * 32 * 64), 3 * 4 * 32
    by_hand = 6 * blocks * 17 * 5 + 4 * patch * 16 * 5 + 12 * 17 * 17 * 32 * 2 * 5
    assert vit_flops(cfg, 5) == by_hand


def _forward(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of a forward under no_grad."""
    with torch.no_grad():
        return measure(lambda: module(x))


@pytest.mark.parametrize("trainable", [True, False])
def test_audio_matches_flop_counter(trainable: bool) -> None:
    """Tiny audio encoder: conv1 over 16 frames (no input grad), conv2 over 8 tokens, 2 blocks."""
    cfg = AudioConfig.tiny()
    enc = AudioEncoder(cfg).requires_grad_(trainable)
    mels = torch.randn(4, 16, 16)
    measured = measure(lambda: enc(mels).sum().backward()) if trainable else _forward(enc, mels)
    assert measured == audio_flops(cfg, 4, trainable=trainable)


@pytest.mark.parametrize(("trainable", "input_grad"), [(True, False), (True, True), (False, True)])
def test_projector_matches_flop_counter(trainable: bool, input_grad: bool) -> None:
    """fc1 computes its input gradient only when the encoder before it trains."""
    proj = MLPProjector(32, 64, 48).requires_grad_(trainable)
    x = torch.randn(7, 32, requires_grad=input_grad)
    measured = measure(lambda: proj(x).sum().backward())
    assert measured == projector_flops(32, 48, 64, 7, trainable=trainable, input_grad=input_grad)


def test_default_cpu_sdpa_is_invisible_to_the_counter() -> None:
    """With the default CPU kernel the counter sees only the matmuls (a later torch may count attention)."""
    cfg = DecoderConfig.tiny()
    model = Decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    measured = measure(lambda: model(input_ids=ids, labels=ids)[0].backward(), math_sdpa=False)
    attention = attention_flops(12, cfg.hidden_size, cfg.num_layers, 2, backward=True)
    assert measured in (decoder_flops(cfg, 2, 12), decoder_flops(cfg, 2, 12) - attention)


FREEZES = {
    "all_trained": (False, False, False),
    "llava_stage1": (True, False, True),  # encoder and LM frozen, projector trained
    "llava_stage2": (True, False, False),  # encoder frozen
    "lm_frozen_encoder_trained": (False, True, True),
}


@pytest.mark.parametrize("freeze", list(FREEZES), ids=list(FREEZES))
def test_llava_step_matches_flop_counter(freeze: str) -> None:
    """A whole tiny LLaVA forward+backward under each freezing recipe: measured = `batch_flops`."""
    enc, proj, lm = FREEZES[freeze]
    provider = LlavaMimoProvider.preset("tiny", freeze_vision_encoder=enc, freeze_projection=proj,
                                        freeze_language_model=lm)
    model = provider.provide()
    images = [1, 2, 0]
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(0))
    for b, n in enumerate(images):
        ids[b, 2 : 2 + 16 * n] = provider.image_token_id
    batch = MimoBatch(ids, ids.roll(-1, 1), {"images": ModalityBatch(torch.randn(3, 3, 8, 8), torch.tensor(images))})
    measured = measure(lambda: model(batch.input_ids, batch.labels, batch.modality_inputs)[0].backward())
    assert measured == batch_flops(provider, batch, LLAVA.modality_flops(provider))


def test_step_breakdown_and_sum() -> None:
    """Per-module parts add up; an absent modality's items count as 0; unknown modalities are refused."""
    lm, vit, audio = DecoderConfig.tiny(), ViTConfig.tiny(), AudioConfig.tiny()
    mods = {"images": ModalityFlops(vit, vit_flops), "audio": ModalityFlops(audio, audio_flops, projector_hidden=16)}
    parts = mimo_step_flops_by_module(lm, 4, 64, mods, {"images": 3})
    assert list(parts) == ["images.encoder", "images.projection", "audio.encoder", "audio.projection", "language"]
    assert parts["audio.encoder"] == parts["audio.projection"] == 0
    assert parts["images.encoder"] == vit_flops(vit, 3)
    assert parts["images.projection"] == projector_flops(32, 64, 64, 48, input_grad=True)
    assert parts["language"] == decoder_flops(lm, 4, 64)
    assert mimo_step_flops(lm, 4, 64, mods, {"images": 3}) == sum(parts.values())
    with pytest.raises(ValueError, match=r"unknown modalities \['video'\]"):
        mimo_step_flops(lm, 4, 64, mods, {"video": 1})


def test_llava_7b_is_about_6n_per_token() -> None:
    """LLaVA-1.5-7B shapes: the language model's 6·N·T dominates, attention adds a few percent at 2k."""
    lm = DecoderConfig.preset("7b")
    parts = mimo_step_flops_by_module(lm, 1, 2048, {"images": ModalityFlops(ViTConfig.clip_vit_l14_336(), vit_flops)},
                                      {"images": 1})
    six_n_t = 6 * (lm.num_params() - lm.vocab_size * lm.hidden_size) * 2048
    assert 1.0 < parts["language"] / six_n_t < 1.15
    print({k: f"{v / 1e12:.2f} TFLOP" for k, v in parts.items()})
