"""AnyRes (LLaVA-NeXT) on the model side: the projector with its trained `image_newline`, and the
packing of one image's projected tile features into its rows.

The tiles of an image (`visual/anyres.py`: the whole image squashed to one tile first, then the
grid row by row) go through the tower and the MLP one by one, `[1 + tiles, N, Dl]`. The rows the
LLM sees are the base tile's N rows, then the grid's features laid out as the image (tile rows
of g feature rows each), the feature rows and columns that only saw padding removed, and
`image_newline` after each feature row: `LlavaNextModel.pack_image_features` exactly, so an
exported model is `LlavaNextForConditionalGeneration`. How many rows an image size gives is
`AnyResGeometry.num_image_tokens`, the count the data pipeline expands the placeholder to.

`image_newline` lives in the projector module: it trains in the projector's optimizer group and is
saved and loaded with `projector.safetensors`, as `image_newline` beside `linear_1` / `linear_2`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.projector import MLPProjector
from visual.anyres import AnyResGeometry


class AnyResProjector(MLPProjector):
    """The `mlp2x_gelu` projector applied to every tile, plus the tiling and `image_newline` [Dl]."""

    def __init__(
        self, vision_hidden_size: int, llm_hidden_size: int, geometry: AnyResGeometry
    ) -> None:
        super().__init__(vision_hidden_size, llm_hidden_size, geometry.base_tokens)
        self.geometry = geometry
        # LLaVA-NeXT's initialisation: normal with std 1/sqrt(Dl), the scale of an embedding row
        std = 1 / math.sqrt(llm_hidden_size)
        self.image_newline = nn.Parameter(torch.randn(llm_hidden_size) * std)

    def pack(self, tile_features: torch.Tensor, image_sizes) -> torch.Tensor:
        """Projected tiles of several images, `[sum of 1 + tiles, N, Dl]` in image order, and
        their (height, width) `[n_img, 2]` -> their rows `[sum of counts, Dl]`, in image order."""
        return pack_images(tile_features, image_sizes, self.geometry, self.image_newline)


def build_anyres_projector(
    kind: str, vision_hidden_size: int, llm_hidden_size: int, geometry: AnyResGeometry
) -> AnyResProjector:
    """The projector of an AnyRes model (`check_anyres_projector`)."""
    check_anyres_projector(kind)
    return AnyResProjector(vision_hidden_size, llm_hidden_size, geometry)


def check_anyres_projector(kind: str) -> None:
    """Only `mlp2x_gelu` keeps every patch of every tile, which the layout needs."""
    if kind != "mlp2x_gelu":
        raise ValueError(
            f"--projector_type {kind} cannot be used with --image_aspect_ratio anyres: AnyRes lays "
            "out every patch of every tile, use --projector_type mlp2x_gelu"
        )


def pack_images(
    tile_features: torch.Tensor,
    image_sizes,
    geometry: AnyResGeometry,
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """`pack_image` for each image of a batch (a loop over images; each image is vectorised)."""
    sizes = [tuple(int(v) for v in size) for size in _size_list(image_sizes)]
    tiles = [geometry.num_tiles(size) for size in sizes]
    if sum(tiles) != tile_features.shape[0]:
        raise ValueError(
            f"image_sizes {sizes} need {sum(tiles)} tiles ({tiles} per image), but there are "
            f"features of {tile_features.shape[0]} tiles"
        )
    chunks = tile_features.split(tiles)
    rows = [
        pack_image(chunk, size, geometry, image_newline)
        for chunk, size in zip(chunks, sizes, strict=True)
    ]
    if not rows:
        return tile_features.new_zeros(0, tile_features.shape[-1])  # [0, Dl]
    return torch.cat(rows)  # [sum of counts, Dl]


def pack_image(
    tile_features: torch.Tensor,
    image_size: tuple[int, int],
    geometry: AnyResGeometry,
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """One image's projected tiles `[1 + tiles, N, Dl]` -> its rows `[count, Dl]`: the base tile's
    N rows, then the unpadded grid with `image_newline` closing each feature row."""
    tile_rows, tile_cols = geometry.tile_grid(image_size)
    side = geometry.patch_side
    count, tokens, dim = tile_features.shape
    if count != 1 + tile_rows * tile_cols or tokens != side * side:
        raise ValueError(
            f"an image of (height, width) {tuple(image_size)} needs features of "
            f"[{1 + tile_rows * tile_cols}, {side * side}, Dl], got {tuple(tile_features.shape)}"
        )
    base = tile_features[0]  # [N, Dl]
    grid = tile_features[1:].view(tile_rows, tile_cols, side, side, dim)
    # [tile row, feature row, tile col, feature col, Dl]: rows of the whole image, top to bottom
    grid = grid.permute(0, 2, 1, 3, 4).reshape(tile_rows * side, tile_cols * side, dim)
    top, bottom, left, right = geometry.feature_window(image_size)
    grid = grid[top:bottom, left:right]  # [rows, cols, Dl], padding removed
    newline = image_newline.to(grid.dtype).expand(grid.shape[0], 1, dim)  # [rows, 1, Dl]
    grid = torch.cat((grid, newline), dim=1)  # [rows, cols + 1, Dl]
    return torch.cat((base, grid.reshape(-1, dim)))  # [count, Dl]


def _size_list(image_sizes) -> list:
    if torch.is_tensor(image_sizes):
        if image_sizes.dim() != 2 or image_sizes.shape[-1] != 2:
            raise ValueError(f"image_sizes must be [n_img, 2], got {tuple(image_sizes.shape)}")
        return image_sizes.tolist()
    return list(image_sizes)
