"""A Hugging Face directory's image preprocessing (`preprocessor_config.json`), with Pillow and torch.

The steps and their arithmetic are those of transformers' PIL image processors (CLIP, SigLIP, LLaVA):
convert to RGB, pad to a square (LLaVA-1.5's `do_pad`, LLaVA's `expand2square`: the image centred on the mean
colour), resize (shortest edge, or a fixed height × width) with the configured Pillow filter on the 8-bit image,
center crop, rescale in float64 then round to float32, normalize per channel in float32.
(transformers' optional torchvision backend resizes with its own kernels, which differ slightly from Pillow's.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SUPPORTED = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor")


class ImageConfigError(ValueError):
    """A preprocessor config mimo cannot reproduce exactly."""


@dataclass(frozen=True)
class ImageProcessor:
    """The preprocessing a directory's `preprocessor_config.json` describes."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict[str, int] | None = None
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = False

    @classmethod
    def square(cls, image_size: int) -> ImageProcessor:
        """A model without a preprocessor config (a mimo preset): resize to its square input size (a no-op for
        images of that size), rescale to [0, 1], normalize with mean = std = 0.5 to [-1, 1] (SigLIP's defaults)."""
        return cls(size={"height": image_size, "width": image_size})

    @classmethod
    def from_directory(cls, directory: str | Path) -> ImageProcessor:
        """Read `preprocessor_config.json` (or `processor_config.json`'s image_processor, as transformers 5
        writes it); an unsupported processor or setting is an error naming it."""
        return cls.from_dict(*read_preprocessor_config(directory))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "preprocessor_config.json") -> ImageProcessor:
        """The processor of a config dict (keys as transformers writes them)."""
        kind = data.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if kind not in SUPPORTED:
            raise ImageConfigError(f"{where}: image_processor_type={kind!r} is not supported by mimo; it implements "
                                   f"{list(SUPPORTED)}")
        if data.get("do_pad") and kind != "LlavaImageProcessor":
            raise ImageConfigError(f"{where}: do_pad=True is LlavaImageProcessor's pad to a square; mimo does not "
                                   f"support it for {kind}")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("image_mean", "image_std"):
            if key in fields:
                value = fields[key]
                fields[key] = tuple(value) if isinstance(value, list) else (float(value),) * 3
        return cls(**fields)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after padding, resizing and cropping."""
        if self.do_pad:
            height = width = max(height, width)
        if self.do_resize:
            height, width = self._resized(height, width)
        if self.do_center_crop:
            height, width = self.crop_size["height"], self.crop_size["width"]
        return height, width

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        """The resize target: the shortest edge scaled to `size.shortest_edge`, or a fixed height × width."""
        size = self.size or {}
        if "shortest_edge" in size and "longest_edge" not in size:
            short, long = sorted((height, width))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if "height" in size and "width" in size:
            return size["height"], size["width"]
        raise ImageConfigError(f"image processor size={size!r} is not supported by mimo; it implements "
                               f"shortest_edge or height+width")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image → pixel values [3, H, W] in float32."""
        if self.do_convert_rgb:
            image = image.convert("RGB")
        if self.do_pad:
            image = self._pad_to_square(image)
        if self.do_resize:
            height, width = self._resized(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = raw.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        values = pixels.to(torch.float64) * self.rescale_factor if self.do_rescale else pixels.to(torch.float64)
        values = values.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
            values = (values - mean) / std
        return values

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        """The image centred on a square of the mean colour (`int(mean * 255)` per channel), the odd row or
        column of padding at the bottom / right, as transformers' `pad_to_square` and LLaVA's `expand2square`."""
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        colour = tuple(int(m * 255) for m in self.image_mean)[:len(image.getbands())]
        square = Image.new(image.mode, (side, side), colour if len(colour) > 1 else colour[0])
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square


def _center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centered height × width window (top/left rounded down, as transformers' center_crop)."""
    h, w = pixels.shape[-2:]
    if height > h or width > w:
        raise ImageConfigError(f"crop_size {height}x{width} exceeds the resized image {h}x{w}; mimo does not pad")
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[..., top:top + height, left:left + width]


def read_preprocessor_config(directory: str | Path) -> tuple[dict[str, Any], str]:
    """(the image processor's settings, where they were read): `preprocessor_config.json`, else
    `processor_config.json`'s image_processor (as transformers 5 writes it); neither is an ImageConfigError."""
    path = Path(directory) / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    path = Path(directory) / "processor_config.json"
    nested = json.loads(path.read_text()).get("image_processor") if path.is_file() else None
    if not isinstance(nested, dict):
        raise ImageConfigError(f"{directory}: no preprocessor_config.json (nor an image_processor in "
                               f"processor_config.json), so the image preprocessing is unknown")
    return nested, f"{path}: image_processor"


def open_image(path: str | Path, what: str = "--image") -> Image.Image:
    """One image file decoded for generation, or a one-line ConfigFileError naming it (`what`: the option that named
    it), a decompression bomb too."""
    from PIL import UnidentifiedImageError

    from mimo.config import ConfigFileError

    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as e:
        raise ConfigFileError(f"{what} {path}: too large to decode safely ({e}); give a smaller image") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ConfigFileError(f"{what} {path}: cannot read it as an image ({e})") from None
    return image
