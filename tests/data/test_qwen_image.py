"""Qwen-VL image preprocessing equals transformers' `Qwen2VLImageProcessor` (PIL backend) on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from mimo.data.qwen_image import QwenImageProcessor, smart_resize
from mimo.hf.image import ImageConfigError

SIZES = [(37, 91), (120, 45), (64, 64), (300, 17), (9, 500)]  # (height, width): tall, wide, tiny, elongated


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("settings", [
    {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 20},  # Qwen2.5-VL's processor, large images scaled down
    {"patch_size": 16, "size": {"shortest_edge": 32 * 32 * 6, "longest_edge": 32 * 32 * 30},  # Qwen3-VL's
     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
])
def test_pixel_values_and_grids_equal_transformers(settings):
    hf = Qwen2VLImageProcessorPil(**settings)
    ours = QwenImageProcessor.from_dict({"image_processor_type": "Qwen2VLImageProcessor", **settings})
    expected = hf(_images(), return_tensors="pt")
    out = ours(_images())
    assert torch.equal(out.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(out.pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)
    assert [list(ours.grid(h, w)) for h, w in SIZES] == expected["image_grid_thw"].tolist()


def test_smart_resize_equals_transformers_over_many_sizes():
    for h in range(5, 400, 23):
        for w in range(7, 900, 61):
            for bounds in ((56 * 56, 28 * 28 * 12), (32 * 32 * 4, 32 * 32 * 300)):
                assert smart_resize(h, w, 28, *bounds) == hf_smart_resize(h, w, 28, *bounds)


def test_overrides_and_bad_settings():
    base = QwenImageProcessor.from_dict({"min_pixels": 3136, "max_pixels": 12845056})
    assert base.with_pixels(max_pixels=28 * 28 * 4).num_tokens(1000, 1000) == 4
    narrowed = base.with_pixels(min_pixels=1000, max_pixels=5000)
    assert QwenImageProcessor.from_dict(narrowed.to_dict()) == narrowed  # what an export writes reads back
    with pytest.raises(ImageConfigError, match="do_pan=True is not a setting"):
        QwenImageProcessor.from_dict({"do_pan": True})
    with pytest.raises(ImageConfigError, match="'CLIPImageProcessor' is not a Qwen-VL image processor"):
        QwenImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="aspect ratio above 200"):
        base.grid(10, 2500)
