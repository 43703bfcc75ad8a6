"""A tiny LLaVA-like model (ViT + MLP projector + decoder), end to end in one process."""

from __future__ import annotations

import pytest
import torch

from mimo.models import (
    MimoModel,
    MimoStubModel,
    ModalityBatch,
    ViTConfig,
    ViTEncoder,
    init_parameters,
)
from tests.models.tiny import tiny_llava

IMAGE_ID, AUDIO_ID = 300, 301


def _llava(dtype: torch.dtype = torch.float64, with_audio: bool = False) -> MimoModel:
    """ViT tiny → projector → decoder tiny (and optionally an audio branch), initialized with seed 7."""
    model = tiny_llava(IMAGE_ID, AUDIO_ID if with_audio else None).to(dtype)
    init_parameters(model, seed=7)
    return model


def _batch(images_per_sample: list[int], seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor, ModalityBatch]:
    """Text ids with a block of 16 image tokens per image after a 2-token prefix; shifted labels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (len(images_per_sample), seq_len), generator=gen)
    for b, n in enumerate(images_per_sample):
        ids[b, 2 : 2 + 16 * n] = IMAGE_ID
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    items = torch.randn(sum(images_per_sample), 3, 8, 8, generator=gen, dtype=torch.float64)
    return ids, labels, ModalityBatch(items, torch.tensor(images_per_sample))


def test_forward_backward_float64() -> None:
    """Finite loss, label count excludes image positions, every parameter gets a non-zero gradient."""
    model = _llava()
    ids, labels, images = _batch([0, 1, 3])
    loss_sum, count = model(ids, labels, {"images": images})
    # 3·63 shifted labels, minus 4·16 image positions, minus the 2 text positions whose target is an image.
    assert int(count) == 3 * 63 - 4 * 16 - 2
    assert loss_sum.dtype == torch.float64 and torch.isfinite(loss_sum)
    (loss_sum / count).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_tokens_per_sample_is_items_times_tokens_per_item() -> None:
    """16 tokens per 8×8 image in 2×2 patches (class token dropped)."""
    model = _llava()
    _, _, images = _batch([0, 1, 3])
    assert model.tokens_per_sample({"images": images})["images"].tolist() == [0, 16, 48]
    assert model.encode({"images": images})["images"].shape == (64, 64)


def test_two_modalities_and_bf16() -> None:
    """Images and audio in one batch; the same model also runs in bf16 with a finite loss."""
    for dtype in (torch.float64, torch.bfloat16):
        model = _llava(dtype, with_audio=True)
        ids, labels, images = _batch([1, 2])
        ids[:, 40:48] = AUDIO_ID  # one 16-frame clip (8 tokens) per sample
        clips = ModalityBatch(torch.randn(2, 16, 16, dtype=dtype), torch.tensor([1, 1]))
        loss_sum, count = model(ids, labels, {"images": images, "audio": clips})
        assert torch.isfinite(loss_sum) and int(count) > 0
        loss_sum.backward()


def test_text_only_batch_and_language_logits() -> None:
    """No modality inputs at all; logits have the vocabulary width."""
    model = _llava()
    ids, labels, _ = _batch([0, 0])
    loss_sum, count = model(ids, labels)
    assert int(count) == 2 * 63
    logits = model.language_logits(model.align_embeddings(ids, {}, {}))
    assert logits.shape == (2, 64, 256)
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"),
        loss_sum, rtol=1e-12, atol=0,
    )


def test_vit_selected_layer_is_the_full_models_hidden_state() -> None:
    """select_layer=-2 builds 2 of 3 blocks and returns what the full tower has after its second block."""
    short = ViTEncoder(ViTConfig.tiny()).double()
    full = ViTEncoder(ViTConfig(**{**ViTConfig.tiny().__dict__, "select_layer": -1})).double()
    assert (len(short.encoder.layers), len(full.encoder.layers)) == (2, 3)
    init_parameters(short, seed=3)
    init_parameters(full, seed=3)
    pixels = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x = full.pre_layrnorm(full.embeddings(pixels))
    for layer in list(full.encoder.layers.values())[:2]:
        x = layer(x)
    torch.testing.assert_close(short(pixels), x[:, 1:], rtol=0, atol=0)
    assert full(pixels).shape == (2, 16, 32)


def test_stub_model_has_no_parameters_and_refuses_data() -> None:
    """A stub rank's model is empty; handing it data is a routing bug."""
    stub = MimoStubModel()
    assert list(stub.parameters()) == []
    assert stub() is None
    with pytest.raises(RuntimeError, match="stub rank"):
        stub(torch.zeros(1))


def test_stub_model_is_an_empty_mimo_model() -> None:
    """Code that walks a model's parts (optimizers, norms, checkpoints) finds nothing on a stub rank."""
    from mimo.distributed import wrapped_modules
    from mimo.models import MimoModel

    stub = MimoStubModel({"images": 7})
    assert isinstance(stub, MimoModel) and stub.language_model is None and len(stub.modality_submodules) == 0
    assert wrapped_modules(stub) == {} and stub.special_token_ids == {"images": 7}
