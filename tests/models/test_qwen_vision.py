"""Qwen2.5-VL's and Qwen3-VL's vision towers equal transformers' on packed images of several sizes.

Tiny random towers in float32, weights copied from transformers' model by name (a strict load: every name
matches). One call packs three images of different, non-square sizes and a two-frame item; the window side
(3 merged tokens) divides none of their grids, and a full-attention layer sits between windowed ones.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen3VisionTower, Qwen25VisionConfig, Qwen25VisionTower
from mimo.models.qwen_vision_geometry import vision_geometry

GRID = torch.tensor([[1, 8, 10], [1, 6, 4], [1, 4, 14], [2, 4, 6]])  # merged 4×5, 3×2, 2×7, 2 frames of 2×3
TOL = dict(rtol=1e-5, atol=1e-5)


def _shape(config: Qwen25VisionConfig | Qwen3VisionConfig) -> dict:
    """The HF vision_config keys both towers share, from mimo's config."""
    return dict(depth=config.depth, hidden_size=config.hidden_size, num_heads=config.num_heads,
                intermediate_size=config.intermediate_size, out_hidden_size=config.out_hidden_size,
                hidden_act=config.hidden_act, patch_size=config.patch_size, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3)


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm gains and biases too), so a misplaced one shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _patches(config: Qwen25VisionConfig | Qwen3VisionConfig) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(int(GRID.prod(-1).sum()), config.patch_dim)


def test_qwen25_tower_equals_transformers_with_windows_that_do_not_divide_the_grids():
    config = Qwen25VisionConfig.tiny()
    hf_config = Qwen2_5_VLVisionConfig(**_shape(config), window_size=config.window_size,
                                       fullatt_block_indexes=list(config.fullatt_block_indexes))
    hf = _randomized(Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config, attn_implementation="sdpa"))
    ours = Qwen25VisionTower(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixels = _patches(config)
    with torch.no_grad():
        expected = hf(pixels, grid_thw=GRID).pooler_output
        out = ours(pixels, GRID)
    assert out.embeddings.shape == (int(GRID.prod(-1).sum()) // 4, config.out_hidden_size) and out.deepstack == ()
    torch.testing.assert_close(out.embeddings, expected, **TOL)


def test_qwen3_tower_and_deepstack_equal_transformers():
    config = Qwen3VisionConfig.tiny()  # DeepStack layers listed out of order: features still come in layer order
    hf_config = Qwen3VLVisionConfig(**_shape(config), num_position_embeddings=config.num_position_embeddings,
                                    deepstack_visual_indexes=list(config.deepstack_visual_indexes))
    hf = _randomized(Qwen3VLVisionModel._from_config(hf_config, attn_implementation="sdpa"))
    ours = Qwen3VisionTower(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixels = _patches(config)
    with torch.no_grad():
        expected = hf(pixels, grid_thw=GRID)
        out = ours(pixels, GRID)
    torch.testing.assert_close(out.embeddings, expected.pooler_output, **TOL)
    assert len(out.deepstack) == len(expected.deepstack_features) == 2
    for ours_feature, hf_feature in zip(out.deepstack, expected.deepstack_features, strict=True):
        torch.testing.assert_close(ours_feature, hf_feature, **TOL)


def test_one_packed_call_equals_each_image_alone():
    """Block-diagonal attention: packing images together changes nothing for any of them."""
    config = Qwen25VisionConfig.tiny()
    tower = _randomized(Qwen25VisionTower(config))
    pixels, sizes = _patches(config), GRID.prod(-1).tolist()
    with torch.no_grad():
        packed = tower(pixels, GRID).embeddings
        alone = [tower(chunk, GRID[i:i + 1]).embeddings for i, chunk in enumerate(pixels.split(sizes))]
    torch.testing.assert_close(packed, torch.cat(alone), **TOL)


def test_window_order_is_a_permutation_grouped_by_window_and_undone_by_its_inverse():
    geometry = vision_geometry(GRID, merge=2, num_patches=int(GRID.prod(-1).sum()), window_tokens=3)
    n = geometry.num_patches
    assert sorted(geometry.window_order.tolist()) == list(range(n)) and sum(geometry.window_lengths) == n
    merged = geometry.window_order.view(-1, 4)[:, 0] // 4
    assert torch.equal(merged[geometry.merged_inverse], torch.arange(n // 4))
    assert geometry.frame_lengths == (80, 24, 56, 24, 24)
    # image 1 (merged 4×5, windows of 3): windows of 3×3, 3×2, 1×3, 1×2 merged tokens
    assert geometry.window_lengths[:4] == (36, 24, 12, 8)


def test_a_geometry_moves_its_index_tensors_and_keeps_its_lengths():
    """`VisionGeometry.to`: what a tower does with the step's CPU grids before indexing patches on a GPU (the GPU
    path itself: tests/models/test_qwen_vision_cuda.py)."""
    geometry = vision_geometry(GRID, merge=2, num_patches=int(GRID.prod(-1).sum()), window_tokens=3)
    assert geometry.to("cpu") is geometry
    moved = geometry.to("meta")
    for name in ("positions", "sizes", "window_order", "merged_inverse"):
        assert getattr(moved, name).device.type == "meta" and getattr(moved, name).shape == getattr(geometry,
                                                                                                 name).shape
    assert (moved.frame_lengths, moved.window_lengths) == (geometry.frame_lengths, geometry.window_lengths)


@pytest.mark.parametrize("grid, patches, message", [
    (torch.tensor([[1, 5, 4]]), 20, "multiples of the spatial merge size"),
    (torch.tensor([[1, 4, 4]]), 20, "accounts for 16 patches but pixel_values holds 20"),
    (torch.tensor([1, 4, 4]), 16, "must be [n_images, 3]"),
])
def test_a_bad_grid_is_refused_in_one_line(grid, patches, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        vision_geometry(grid, merge=2, num_patches=patches)


def test_pixel_values_of_another_patch_size_are_refused():
    tower = Qwen3VisionTower(Qwen3VisionConfig.tiny())
    with pytest.raises(ValueError, match=r"packed patches \[N, 24\]"):
        tower(torch.zeros(16, 3 * 2 * 14 * 14), torch.tensor([[1, 4, 4]]))
