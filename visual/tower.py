"""`VisionTower`: the frozen image encoder contract shared by every backend.

`forward(pixel_values [n, 3, H, W]) -> features [n, N, Dv]`, patch tokens only (a CLIP class
token is dropped, SigLIP has none), taken from `feature_layer`. The tower never trains: its
parameters have `requires_grad=False`, it stays in eval mode even when the enclosing model is put
in train mode, and its forward runs under `torch.no_grad()`.

`feature_layer` uses the transformers `hidden_states` convention: -1 is the last block's output,
-2 (default, as in LLaVA) the one before; positive k is the output of block k (1-based). The
embedding output (0) is not a useful feature layer and is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from visual.preprocessing import ImagePreprocessor
from visual.processing import FixedGridProcessor


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """Map `feature_layer` onto a negative block index in [-num_layers, -1]."""
    if 1 <= feature_layer <= num_layers:
        return feature_layer - num_layers - 1
    if -num_layers <= feature_layer <= -1:
        return feature_layer
    raise ValueError(
        f"feature_layer={feature_layer} is out of range for a tower with {num_layers} layers: "
        f"use -1..-{num_layers} or 1..{num_layers}"
    )


class VisionTower(nn.Module):
    """Base class; subclasses set `self.model` and implement `_patch_features`."""

    def __init__(
        self,
        *,
        preprocessor: ImagePreprocessor,
        num_image_tokens: int,
        hidden_size: int,
        feature_layer: int,
        settings: dict[str, Any],
        patch_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self.num_image_tokens = num_image_tokens
        self.hidden_size = hidden_size
        self.feature_layer = feature_layer
        # (rows, cols) of the patch tokens laid out over the image, row-major; None where the
        # tokens are not a spatial grid (Qwen-VL's resampled queries), so the image cannot be tiled
        self.patch_grid = patch_grid
        # What load_vision_tower(**settings) needs to rebuild this tower; saved with checkpoints.
        self.settings = dict(settings)

    @property
    def image_size(self) -> int:
        """Side of the square images the tower takes."""
        return self.preprocessor.output_size[0]

    @property
    def image_processor(self) -> FixedGridProcessor:
        """The tower's own processor: its preprocessing, `num_image_tokens` rows per image (a
        model whose projector changes the count builds its own, `VisionLanguageModel`)."""
        return FixedGridProcessor(self.preprocessor, self.num_image_tokens)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Stop gradients and put the tower in eval mode; called once by every constructor."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTower:
        # The enclosing VLM calls .train() on everything; dropout or batch-norm updates in a frozen
        # tower would silently change the features, so the tower ignores the request.
        return super().train(False)

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> `pixel_values` [n, 3, H, W] float32 with this tower's constants."""
        return self.preprocessor(images)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, num_image_tokens, hidden_size], no gradients."""
        self._check_pixel_values(pixel_values)
        with torch.no_grad():
            features = self._patch_features(pixel_values.to(self.device, self.dtype))  # [n, N, Dv]
        if features.shape[1:] != (self.num_image_tokens, self.hidden_size):
            raise RuntimeError(
                f"{type(self).__name__} produced features of shape {tuple(features.shape)}, "
                f"expected [n, {self.num_image_tokens}, {self.hidden_size}]"
            )
        return features

    def _patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        height, width = self.preprocessor.output_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, height, width):
            raise ValueError(
                f"pixel_values must have shape [n, 3, {height}, {width}] for this tower, "
                f"got {tuple(pixel_values.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"library={self.settings.get('library')}, num_image_tokens={self.num_image_tokens}, "
            f"hidden_size={self.hidden_size}, feature_layer={self.feature_layer}"
        )
