"""On a GPU (skipped without one): meta build + init straight onto CUDA, float64 parity with CPU, bf16 runs,
batches prefetched to the device."""

from __future__ import annotations

import pytest
import torch

from mimo.models import (
    MimoModel,
    ModalityBatch,
    init_parameters,
)
from tests.models.tiny import tiny_llava

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IMAGE_ID = 400


def _model(device: str, dtype: torch.dtype) -> MimoModel:
    """Tiny LLaVA-like model built on meta and materialized on `device` by init_parameters."""
    with torch.device("meta"):
        model = tiny_llava(IMAGE_ID).to(dtype)
    init_parameters(model, seed=1, device=device)
    return model


def _loss(model: MimoModel, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Mean loss of a fixed batch with 0 and 2 images."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 48), generator=gen)
    ids[1, 3:35] = IMAGE_ID
    labels = torch.roll(ids, -1, 1)
    pixels = torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype)
    batch = {"images": ModalityBatch(pixels.to(device), torch.tensor([0, 2]))}
    loss_sum, count = model(ids.to(device), labels.to(device), batch)
    return loss_sum / count


def test_cuda_float64_matches_cpu_and_bf16_trains() -> None:
    """Same seed, same numbers on both devices; bf16 forward/backward is finite."""
    cpu = _loss(_model("cpu", torch.float64), "cpu", torch.float64)
    gpu_model = _model("cuda", torch.float64)
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    assert gpu_model.language_model.rope_cos.device.type == "cuda"
    torch.testing.assert_close(_loss(gpu_model, "cuda", torch.float64).cpu(), cpu, rtol=1e-8, atol=0)
    bf16 = _model("cuda", torch.bfloat16)
    loss = _loss(bf16, "cuda", torch.bfloat16)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in bf16.parameters())


def test_prefetch_copies_to_the_gpu_and_keeps_counts_on_the_cpu() -> None:
    """`MimoBatch.prefetch` pins and copies without blocking; `select` still slices by the CPU counts."""
    from mimo.data import MimoBatch

    ids = torch.arange(12).view(3, 4)
    batch = MimoBatch(ids, ids + 1, {"images": ModalityBatch(torch.randn(3, 3, 8, 8), torch.tensor([1, 0, 2]))})
    pinned = batch.pin_memory()
    assert pinned.input_ids.is_pinned() and pinned.select(1, 3).modality_inputs["images"].items.is_pinned()
    on_gpu = pinned.prefetch("cuda", modalities=("images",))
    assert on_gpu.input_ids.is_cuda and on_gpu.modality_inputs["images"].items.is_cuda
    assert not on_gpu.modality_inputs["images"].items_per_sample.is_cuda
    torch.testing.assert_close(on_gpu.select(1, 3).modality_inputs["images"].items.cpu(),
                               batch.modality_inputs["images"].items[1:])
