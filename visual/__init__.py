"""Vision side of the VLM: image decoding, preprocessing constants, frozen vision towers.

This package owns the number of image tokens per image, the feature width Dv, CLS handling, the
feature layer and the image preprocessing; other packages read them from a `VisionTower`.
"""

from visual.image_io import ImageLoadError, load_image, to_rgb
from visual.loading import load_vision_tower
from visual.preprocessing import ImagePreprocessor
from visual.tower import VisionTower

__all__ = [
    "ImageLoadError",
    "ImagePreprocessor",
    "VisionTower",
    "load_image",
    "load_vision_tower",
    "to_rgb",
]
