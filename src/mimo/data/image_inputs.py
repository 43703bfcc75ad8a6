"""How a LLaVA-format dataset turns one decoded image into the model's input and the number of image tokens it takes
in the text: LLaVA's towers take every image at one size (`FixedSizeImages`, a fixed token count each); Qwen-VL's
take each image at its native resolution as patches (`PackedImages`: its grid decides its token count, and a
sample's images are packed rows with their grids, see `ModalityBatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mimo.data.qwen_image import QwenImageProcessor
from mimo.hf.image import ImageProcessor


class ImageInputError(ValueError):
    """An image that preprocesses to something the model cannot take."""


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model takes it: `values` ([3, H, W], or packed rows [h·w, D] with its `grid`), and the
    number of image tokens it stands for in the text."""

    values: torch.Tensor
    tokens: int
    grid: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FixedSizeImages:
    """LLaVA's: each image through the tower's image processor to `size` (height, width), `tokens_per_image`
    tokens each; a sample's images stacked [k, 3, H, W]."""

    processor: ImageProcessor
    size: tuple[int, int]
    tokens_per_image: int

    def prepare(self, image: Image.Image) -> PreparedImage:
        """The image preprocessed; another size than the tower's is an ImageInputError."""
        pixels = self.processor(image)
        if tuple(pixels.shape[1:]) != tuple(self.size):
            raise ImageInputError(f"the image preprocesses to {tuple(pixels.shape[1:])}, the vision encoder takes "
                                  f"{tuple(self.size)}")
        return PreparedImage(pixels, self.tokens_per_image)

    def sample_items(self, images: Sequence[PreparedImage], dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """A sample's items [k, 3, H, W] (k may be 0), and no grids."""
        if not images:
            return torch.empty(0, 3, *self.size, dtype=dtype), None
        return torch.stack([i.values for i in images]).to(dtype), None


@dataclass(frozen=True)
class PackedImages:
    """Qwen-VL's: each image at its own size (`QwenImageProcessor`: smart_resize, patches in merge order), its
    (1, h, w) patch grid and h·w / merge² tokens; a sample's images packed rows [Σ h·w, C·T·P·P] with grids [k, 3]."""

    processor: QwenImageProcessor

    @property
    def row_width(self) -> int:
        """Values per patch row: 3 channels × the temporal patch × patch²."""
        p = self.processor
        return 3 * p.temporal_patch_size * p.patch_size * p.patch_size

    def prepare(self, image: Image.Image) -> PreparedImage:
        """The image's patches, grid and token count (an aspect ratio the processor refuses: ImageInputError)."""
        try:
            packed = self.processor([image])
        except ValueError as e:
            raise ImageInputError(str(e)) from None
        grid = tuple(packed.image_grid_thw[0].tolist())
        return PreparedImage(packed.pixel_values, grid[0] * grid[1] * grid[2] // self.processor.merge_size**2, grid)

    def sample_items(self, images: Sequence[PreparedImage],
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample's packed rows [r, D] and grids [k, 3] (k may be 0)."""
        grids = torch.tensor([i.grid for i in images], dtype=torch.long).reshape(-1, 3)
        if not images:
            return torch.empty(0, self.row_width, dtype=dtype), grids
        return torch.cat([i.values for i in images]).to(dtype), grids
