"""Image preprocessing for a vision tower: optional pad-to-square, resize, center-crop, normalise.

One PIL + torch pipeline serves both libraries; only the constants differ, and they are read from
the tower's own files (`preprocessor_config.json` for transformers, the preprocess cfg for
open_clip). Resizing is PIL's C implementation on uint8 images, the same operation transformers'
PIL backend and torchvision's `Resize` on PIL images perform, so results match theirs; there is
no per-pixel Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from visual.image_io import to_rgb

# "anyres" (LLaVA-NeXT) tiles the image (visual/anyres.py); the tower's own preprocessing then only
# normalises the square tiles, so it neither pads nor resizes them.
ASPECT_RATIOS = ("resize", "pad", "anyres")
# LLaVA-1.5's choice: pad to a square with the mean colour, so nothing is cropped away.
DEFAULT_ASPECT_RATIO = "pad"
# Towers trained with another convention keep theirs unless the flag says otherwise: Qwen-VL's
# own preprocessing resizes to a square (visual/qwen_vl_tower.py).
TOWER_ASPECT_RATIOS = {"qwen_vl": "resize"}


def default_aspect_ratio(library: str) -> str:
    """The aspect-ratio handling of a tower library when `image_aspect_ratio` is not given."""
    return TOWER_ASPECT_RATIOS.get(library, DEFAULT_ASPECT_RATIO)


# Defaults used only when a checkpoint ships no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Turns PIL images into `pixel_values` [n, 3, H, W] float32.

    Exactly one of `shortest_edge` (resize the short side, keep the aspect ratio; CLIP) or
    `resize_size` ((H, W), ignore the aspect ratio; SigLIP) is set. `crop_size` (H, W), if set,
    is a center crop after resizing. With `pad_to_square`, the image is first padded to a square
    filled with the mean colour (LLaVA's "pad" aspect ratio), so nothing is cropped away.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    resize_size: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    pad_to_square: bool = False

    def __post_init__(self) -> None:
        if (self.shortest_edge is None) == (self.resize_size is None):
            raise ValueError("ImagePreprocessor needs exactly one of shortest_edge / resize_size")
        if self.shortest_edge is not None and self.crop_size is None:
            raise ValueError("a shortest-edge resize needs a crop_size to give a fixed image size")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean/std must have 3 values, got {self.mean} / {self.std}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of every preprocessed image."""
        size = self.crop_size or self.resize_size
        assert size is not None  # guaranteed by __post_init__
        return size

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """The mean colour in 0..255, used to pad images to a square. Truncated, not rounded, as
        LLaVA-1.5's `expand2square` and transformers' `LlavaImageProcessor` do, so an exported model
        pads exactly as training did (CLIP (122, 116, 104), SigLIP (127, 127, 127))."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess one image or a list of images -> [n, 3, H, W] float32."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            height, width = self.output_size
            return torch.empty(0, 3, height, width)
        arrays = [np.asarray(self._geometry(to_rgb(image))) for image in images]
        pixels = torch.from_numpy(np.stack(arrays))  # [n, H, W, 3] uint8
        pixels = pixels.permute(0, 3, 1, 2).float() * self.rescale_factor  # [n, 3, H, W]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).contiguous()

    def _geometry(self, image: Image.Image) -> Image.Image:
        """Pad, resize and crop one RGB image to `output_size`."""
        if self.pad_to_square:
            image = pad_to_square(image, self.fill_color)
        width, height = image.size
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_long = max(1, int(self.shortest_edge * long / short))
            new_w, new_h = (
                (self.shortest_edge, new_long)
                if width <= height
                else (new_long, self.shortest_edge)
            )
        else:
            new_h, new_w = self.resize_size  # type: ignore[misc]
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample)
        if self.crop_size is not None:
            image = center_crop(image, self.crop_size)
        return image


def pad_to_square(image: Image.Image, fill_color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of the long side, image centred, the rest `fill_color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center crop to (H, W); an image smaller than that is padded with black, like transformers."""
    crop_h, crop_w = size
    width, height = image.size
    top = (height - crop_h) // 2  # same rounding as transformers' center_crop
    left = (width - crop_w) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def preprocessor_from_hf_dict(
    config: Mapping[str, Any], image_aspect_ratio: str, source: str
) -> ImagePreprocessor:
    """Build from a transformers `preprocessor_config.json` dict (`source` names it in errors)."""
    pad = pads_to_square(image_aspect_ratio)
    size = config.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = config.get("crop_size") if config.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    try:
        return ImagePreprocessor(
            mean=tuple(config["image_mean"]),  # type: ignore[arg-type]
            std=tuple(config["image_std"]),  # type: ignore[arg-type]
            shortest_edge=size.get("shortest_edge"),
            resize_size=(size["height"], size["width"]) if "height" in size else None,
            crop_size=(crop["height"], crop["width"]) if crop else None,
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            pad_to_square=pad,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"unsupported image preprocessing config in {source}: {err}") from err


def pads_to_square(image_aspect_ratio: str) -> bool:
    """True for "pad", False for "resize" and "anyres"; a ValueError naming the flag otherwise."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"image_aspect_ratio={image_aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}"
        )
    return image_aspect_ratio == "pad"
