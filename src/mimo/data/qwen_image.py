"""Qwen-VL image preprocessing at native resolution: transformers' `Qwen2VLImageProcessor` (its PIL backend).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share it. Each image keeps its aspect ratio: `smart_resize` picks the nearest
size whose sides are multiples of patch × merge (28 px for 14-px patches, 32 for 16) with a pixel count inside
[min_pixels, max_pixels]; the image is resized to it with Pillow (bicubic), rescaled and normalized as
`mimo.hf.image` does (transformers' arithmetic), then cut into patches: [h·w, C·T·P·P] per image, the one frame
repeated over the temporal patch of 2, the patches in merge order (each merge×merge block of neighbours
consecutive, blocks row by row: what the tower's merger concatenates). A batch's images are packed back to back
(`pixel_values`), their grids in `image_grid_thw` [n, 3] = (1, h, w) in patches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from mimo.hf.image import ImageConfigError, ImageProcessor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # transformers refuses more elongated images
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
# keys a preprocessor config may hold that do not change the pixels of an image
NEUTRAL_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "return_tensors",
                          "data_format", "input_data_format", "device", "disable_grouping", "default_to_square"})


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) transformers resizes to: sides multiples of `factor`, the aspect ratio kept as near
    as may be, the pixel count within [min_pixels, max_pixels] (transformers' `smart_resize`, to the float)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} px: aspect ratio above {MAX_ASPECT_RATIO}, which Qwen-VL's "
                         f"processor refuses")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImages:
    """A batch's images packed: pixel_values [N, C·T·P·P] float32, image_grid_thw [n, 3] long."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


@dataclass(frozen=True)
class QwenImageProcessor:
    """The preprocessing of a Qwen-VL directory's `preprocessor_config.json` (defaults: transformers')."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        """Refuse pixel bounds that cannot hold one merged patch, or that cross."""
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ImageConfigError(f"min_pixels {self.min_pixels} and max_pixels {self.max_pixels}: need "
                                   f"0 < min_pixels <= max_pixels")

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: patch × merge pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "preprocessor_config.json") -> QwenImageProcessor:
        """The processor of a config dict as transformers 4 or 5 writes it (`min_pixels`/`max_pixels`, or `size`
        with shortest_edge / longest_edge as pixel counts); any other key is an error naming it."""
        kind = data.get("image_processor_type", PROCESSOR_TYPES[0])
        if kind not in PROCESSOR_TYPES:
            raise ImageConfigError(f"{where}: image_processor_type={kind!r} is not a Qwen-VL image processor; "
                                   f"expected one of {list(PROCESSOR_TYPES)}")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        size = data.get("size") or {}
        fields.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        fields.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        unknown = sorted(set(data) - set(fields) - NEUTRAL_KEYS - {"size"})
        if unknown:
            raise ImageConfigError(f"{where}: {unknown[0]}={data[unknown[0]]!r} is not a setting mimo implements "
                                   f"for {kind}")
        for key in ("image_mean", "image_std"):
            if key in fields:
                value = fields[key]
                fields[key] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a `preprocessor_config.json` (the pixel bounds both as `size`, transformers 5's, and as
        min_pixels / max_pixels, transformers 4's); `from_dict` reads it back to this processor."""
        return {"image_processor_type": PROCESSOR_TYPES[0], "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "resample": int(self.resample),
                "do_convert_rgb": self.do_convert_rgb, "do_resize": self.do_resize, "do_rescale": self.do_rescale,
                "do_normalize": self.do_normalize}

    def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> QwenImageProcessor:
        """This processor with `data.min_pixels` / `data.max_pixels` overrides (None: keep the directory's)."""
        return replace(self, min_pixels=self.min_pixels if min_pixels is None else min_pixels,
                       max_pixels=self.max_pixels if max_pixels is None else max_pixels)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of `height` × `width` px is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image of `height` × `width` px: its `image_grid_thw` row."""
        h, w = self.resized(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens the tower emits for such an image (patches / merge²): its placeholder count in the prompt."""
        _, h, w = self.grid(height, width)
        return h * w // self.merge_size**2

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One image resized, rescaled and normalized: [C, H, W] float32."""
        height, width = self.resized(image.height, image.width)
        steps = ImageProcessor(do_convert_rgb=self.do_convert_rgb, do_resize=self.do_resize,
                               size={"height": height, "width": width}, resample=self.resample,
                               do_rescale=self.do_rescale, rescale_factor=self.rescale_factor,
                               do_normalize=self.do_normalize, image_mean=self.image_mean, image_std=self.image_std)
        return steps(image)

    def patchify(self, values: torch.Tensor) -> torch.Tensor:
        """[C, H, W] → [h·w, C·T·P·P] in merge order, the frame repeated over the temporal patch."""
        c, height, width = values.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if height % (p * m) or width % (p * m):
            raise ValueError(f"a {height}x{width} image does not split into {p * m}-px merged patches")
        gh, gw = height // p, width // p
        blocks = values.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)
        return frames.reshape(gh * gw, c * t * p * p)

    def __call__(self, images: Sequence[Image.Image]) -> QwenImages:
        """A batch's images packed, as transformers' processor returns them."""
        patches, grids = [], []
        for image in images:
            values = self.pixels(image)
            patches.append(self.patchify(values))
            grids.append((1, values.shape[1] // self.patch_size, values.shape[2] // self.patch_size))
        return QwenImages(torch.cat(patches), torch.tensor(grids, dtype=torch.long).reshape(-1, 3))
