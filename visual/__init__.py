"""Vision side of the VLM: image decoding, preprocessing constants, frozen vision towers.

This package owns the number of image tokens per image, the feature width Dv, CLS handling, the
feature layer and the image preprocessing; other packages read them from a `VisionTower`.

Image decoding (`load_image`, `to_rgb`) needs only PIL and numpy, and `dataprocess` (which has
no torch) calls it too: so the tower names are imported on first use, not with the package.
"""

from __future__ import annotations

import importlib
from typing import Any

from visual.image_io import ImageLoadError, load_image, to_rgb

_TORCH_SIDE = {
    "load_vision_tower": "visual.loading",
    "ImagePreprocessor": "visual.preprocessing",
    "VisionTower": "visual.tower",
}


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        return getattr(importlib.import_module(_TORCH_SIDE[name]), name)
    raise AttributeError(f"module 'visual' has no attribute {name!r}")


__all__ = [
    "ImageLoadError",
    "ImagePreprocessor",
    "VisionTower",
    "load_image",
    "load_vision_tower",
    "to_rgb",
]
