"""The image side of the processor seam: pixels for the tower, and how many tokens an image becomes.

An image processor answers two questions about one decoded image (`visual.load_image`: RGB,
EXIF orientation applied):

- `preprocess(image) -> pixel_values`: what the tower reads. A fixed grid gives one `[3, H, W]`
  tensor; a tiling processor (AnyRes) gives `[1 + tiles, 3, S, S]`.
- `num_image_tokens(image_size) -> int`: how many placeholder ids (= projected feature rows) the
  image becomes, from its `(height, width)` alone, so records can be tokenized before any pixel
  is decoded.

`pixel_values(images)` batches several images as the model reads them: per-image tensors
concatenated along dim 0 in image order (`[n_img, 3, H, W]` for a fixed grid, all tiles one after
another for a tiling processor); the `[n_img, 2]` long tensor `image_sizes` (height, width)
travels beside them, as in transformers' LLaVA-NeXT. `fixed_num_image_tokens`
is the count when it does not depend on the size (a fixed grid), else None: the feature cache and
other fixed-shape shortcuts ask it.

This module owns the contract and the fixed-grid implementation. Nobody else computes a count:
the dataset, inference, `dataprocess stats`, the feature cache and the export ask a processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from visual.preprocessing import ImagePreprocessor


@runtime_checkable
class ImageProcessor(Protocol):
    """What the dataset, inference and the model need to know about images (module docstring)."""

    fixed_num_image_tokens: int | None

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...

    def num_image_tokens(self, image_size: tuple[int, int]) -> int: ...

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


@dataclass(frozen=True)
class FixedGridProcessor:
    """Every image becomes one `[3, H, W]` tensor (pad / resize / crop as the tower's
    `ImagePreprocessor` says) and the same `tokens` rows, whatever its size: LLaVA-1.5's grid.

    `tokens` is the model's count per image (the projector's output rows: the tower's N, or a
    resampler's queries), so it is given, not derived here. `preprocessor` None makes a
    count-only processor (`dataprocess stats` given N by a checkpoint or a flag, no tower).
    """

    preprocessor: ImagePreprocessor | None
    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens per image must be >= 0, got {self.tokens}")

    @property
    def fixed_num_image_tokens(self) -> int:
        return self.tokens

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> `[3, H, W]` float32."""
        return self.pixel_values([image])[0]

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """The grid's constant count; `image_size` (height, width) only has to be a size."""
        height, width = image_size
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive (height, width), got {image_size}")
        return self.tokens

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Several images -> `[n_img, 3, H, W]`, normalised in one vectorised step."""
        if self.preprocessor is None:
            raise ValueError("this image processor only counts tokens: it has no preprocessing")
        return self.preprocessor(list(images))
