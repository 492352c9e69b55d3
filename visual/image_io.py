"""Image decoding: any file PIL can read becomes an 8-bit RGB `PIL.Image`.

This is the only place that decodes images: training, inference, the feature cache, evaluation
(files and embedded bytes), the web chat, `dataprocess validate / images / boxes` all call
`load_image` (or `to_rgb` on an image already open), so a picture has the same pixels on every
path. Everything downstream (padding, resizing, normalisation) may assume RGB, uint8, EXIF
orientation already applied.

Mode conversion rules:
- alpha (RGBA, LA, PA, P with a transparency entry) is composited on **white**, because most
  transparent images in captioning corpora are logos or drawings made to sit on a white page;
- 16-bit and 32-bit integer / float grey images (I;16*, I, F) are rescaled to 0..255 rather than
  clipped, so a 16-bit scan does not turn white;
- every other mode (L, 1, CMYK, YCbCr, LAB, HSV, ...) goes through PIL's own `convert("RGB")`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag


class ImageLoadError(ValueError):
    """An image file is missing, corrupt, or not an image; the message names the file.

    `image` is the path as the records spell it, where the caller knows it (to name the record).
    """

    def __init__(self, message: str, image: str | None = None) -> None:
        super().__init__(message)
        self.image = image


def load_image(path: str | os.PathLike[str] | bytes | Image.Image) -> Image.Image:
    """Decode `path` into an RGB image with EXIF orientation applied.

    Encoded bytes (an image embedded in a TSV or parquet file) are decoded the same way; a
    `PIL.Image` is only normalised (mode, orientation). Raises `ImageLoadError` naming the file
    for a missing, unreadable, truncated or non-image file.
    """
    if isinstance(path, Image.Image):
        return to_rgb(path)
    if isinstance(path, bytes):
        file, name = io.BytesIO(path), f"embedded image ({len(path)} bytes)"
    else:
        file = name = Path(path)
        if not file.is_file():
            raise ImageLoadError(f"image file not found: {file}")
    try:
        with Image.open(file) as image:
            image.load()  # decode now, so a truncated file fails here and not in a worker later
            return to_rgb(image)
    except ImageLoadError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        raise ImageLoadError(f"cannot decode image file {name}: {err}") from err


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of the image `load_image(path)` would return, from the file's header
    (EXIF orientation 5-8 swaps the sides); raises `ImageLoadError` naming the file."""
    file = Path(path)
    if not file.is_file():
        raise ImageLoadError(f"image file not found: {file}")
    try:
        with Image.open(file) as image:
            width, height = image.size
            transposed = image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image file {file}: {err}") from err
    return (width, height) if transposed else (height, width)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as 8-bit RGB, EXIF-rotated, alpha composited on white (see module doc)."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # A palette may carry transparency; going through RGBA keeps it for the composite below.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode.startswith("I") or mode == "F":
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float grey image onto 8-bit 'L' by its value range."""
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode == "F" and values.size and float(values.max()) <= 1.0:
        values = values * 255.0  # float images in 0..1
    elif image.mode.startswith("I;16") or (values.size and float(values.max()) > 255.0):
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"
