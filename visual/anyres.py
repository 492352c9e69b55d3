"""AnyRes (LLaVA-NeXT) geometry: which grid of tiles an image becomes, and how many tokens.

An image of (height, width) is matched to one of the grid pinpoints (resolutions in pixels, each a
multiple of the tower's square input side S): the one that keeps the most of the image's pixels,
then the one that wastes the least canvas (transformers' `select_best_resolution`). The image is
resized into it keeping its aspect ratio, centred on a black canvas of the pinpoint's size, and
cut into S x S tiles row by row; the whole image squashed to one S x S tile comes first.

Each tile becomes the tower's g x g patch features (g = S / patch). The model lays the tiles' features
out as the grid, drops the rows or columns that only saw padding ("unpad", in feature units, with
transformers' rounding), and appends one `image_newline` per remaining row; the base tile's N
features come first. So an image costs `rows * cols + rows + N` tokens, which this module computes
from the image size alone; `model/anyres.py` builds exactly that many rows.

The patch grid and N come from the tower (`VisionTower.patch_grid`, `num_image_tokens`); a tower
whose tokens are not a spatial grid (Qwen-VL's resampled queries) cannot be tiled and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from visual.image_io import to_rgb
from visual.preprocessing import ImagePreprocessor
from visual.tower import VisionTower

PINPOINTS_FLAG = "--image_grid_pinpoints"
MAX_TILES_FLAG = "--image_max_tiles"
# LLaVA-NeXT's five layouts for 336 px (1x2, 2x1, 2x2, 3x1, 1x3 tiles as rows x columns), in tiles.
DEFAULT_TILE_LAYOUTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(tile_size: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT's default pinpoints scaled to a tower of side `tile_size` ([336, 672], ... for 336)."""
    return [(rows * tile_size, cols * tile_size) for rows, cols in DEFAULT_TILE_LAYOUTS]


def check_pinpoints(pinpoints, tile_size: int) -> list[tuple[int, int]]:
    """[[height, width], ...] in pixels, each a positive multiple of `tile_size`; a ValueError
    naming the flag otherwise."""
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence):
        raise ValueError(
            f"{PINPOINTS_FLAG} {pinpoints!r}: expected a list of [height, width] pairs"
        )
    if len(pinpoints) == 0:
        raise ValueError(f"{PINPOINTS_FLAG} is empty: give at least one [height, width] pair")
    checked = []
    for pair in pinpoints:
        ints = isinstance(pair, Sequence) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pair
        )
        if not ints or len(pair) != 2 or min(pair) <= 0:
            raise ValueError(
                f"{PINPOINTS_FLAG}: {pair!r} is not a [height, width] pair of positive integers"
            )
        if pair[0] % tile_size or pair[1] % tile_size:
            raise ValueError(
                f"{PINPOINTS_FLAG}: {list(pair)} is not a multiple of the vision tower's image "
                f"size {tile_size} in both height and width"
            )
        checked.append((int(pair[0]), int(pair[1])))
    return checked


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The pinpoint (height, width) keeping the most image pixels, then wasting the least canvas;
    ties keep the first listed (transformers' `select_best_resolution`)."""
    height, width = image_size
    best, best_key = pinpoints[0], None
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(target_w * target_h - effective))
        if best_key is None or key > best_key:
            best, best_key = (target_h, target_w), key
    return best


def resized_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into `target` keeping its aspect ratio: the limiting
    side fills the target, the other is rounded up (transformers' `get_patch_output_size`)."""
    height, width = image_size
    target_h, target_w = target
    if target_w / width < target_h / height:
        return min(math.ceil(height * target_w / width), target_h), target_w
    return target_h, min(math.ceil(width * target_h / height), target_w)


@dataclass(frozen=True)
class AnyResGeometry:
    """The tiling of one tower: tile side S, patch grid g x g per tile, N tokens of the base tile."""

    tile_size: int
    patch_side: int
    base_tokens: int
    pinpoints: tuple[tuple[int, int], ...]

    def tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of (height, width)."""
        height, width = select_best_resolution(_checked_size(image_size), self.pinpoints)
        return height // self.tile_size, width // self.tile_size

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles including the base one: the first dimension of `preprocess`'s output."""
        rows, cols = self.tile_grid(image_size)
        return 1 + rows * cols

    def feature_window(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the tile grid's features that saw the image, not the
        padding: the rounding of transformers' `unpad_image`, on the feature grid."""
        height, width = _checked_size(image_size)
        rows, cols = self.tile_grid(image_size)
        grid_h, grid_w = rows * self.patch_side, cols * self.patch_side
        if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
            kept = int(round(height * (grid_w / width), 7))
            pad = (grid_h - kept) // 2
            return pad, grid_h - pad, 0, grid_w
        kept = int(round(width * (grid_h / height), 7))
        pad = (grid_w - kept) // 2
        return 0, grid_h, pad, grid_w - pad

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Placeholder tokens for an image of (height, width): the unpadded grid, one newline per
        row, and the base tile's N."""
        top, bottom, left, right = self.feature_window(image_size)
        rows = bottom - top
        return rows * (right - left) + rows + self.base_tokens

    def max_image_tokens(self) -> int:
        """An upper bound on `num_image_tokens` over all image sizes (an image of a pinpoint's
        exact shape, nothing unpadded): what a sample must leave room for."""
        side, tile = self.patch_side, self.tile_size
        grids = [(h // tile * side, w // tile * side) for h, w in self.pinpoints]
        return max(rows * cols + rows for rows, cols in grids) + self.base_tokens


def _checked_size(image_size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (height, width) must be positive, got {tuple(image_size)}")
    return height, width


def anyres_geometry(
    tower: VisionTower, pinpoints=None, max_tiles: int | None = None
) -> AnyResGeometry:
    """The tower's tiling; `pinpoints` None: `default_pinpoints`. `max_tiles` drops the pinpoints
    of more tiles (the base tile not counted), capping an image's tokens (LLaVA-OneVision's
    `anyres_max_N` idea, done on the pinpoints so the model stays LLaVA-NeXT exactly)."""
    grid = tower.patch_grid
    if grid is None:
        raise ValueError(
            f"--image_aspect_ratio anyres needs a tower whose tokens are a patch grid; "
            f"{type(tower).__name__} ({tower.settings.get('library')}) gives "
            f"{tower.num_image_tokens} tokens that are not one"
        )
    if grid[0] != grid[1] or grid[0] * grid[1] != tower.num_image_tokens:
        raise ValueError(
            f"--image_aspect_ratio anyres needs a square patch grid covering every token; "
            f"the tower has a {grid[0]}x{grid[1]} grid and {tower.num_image_tokens} tokens"
        )
    size = tower.image_size
    checked = check_pinpoints(default_pinpoints(size) if pinpoints is None else pinpoints, size)
    if max_tiles is not None:
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
            raise ValueError(f"{MAX_TILES_FLAG} {max_tiles!r}: expected a positive integer")
        kept = [(h, w) for h, w in checked if (h // size) * (w // size) <= max_tiles]
        if not kept:
            raise ValueError(
                f"{MAX_TILES_FLAG} {max_tiles} leaves none of {PINPOINTS_FLAG} "
                f"{[list(p) for p in checked]}"
            )
        checked = kept
    return AnyResGeometry(size, grid[0], tower.num_image_tokens, tuple(checked))


class AnyResImageProcessor:
    """PIL image -> `pixel_values` [1 + tiles, 3, S, S] (base tile first, then the tiles row by
    row), and the image's token count; the tower's own normalisation and resampling. An
    `ImageProcessor` (visual/processing.py) whose count depends on the image size."""

    fixed_num_image_tokens = None  # the count depends on the image size

    def __init__(self, geometry: AnyResGeometry, preprocessor: ImagePreprocessor) -> None:
        if preprocessor.output_size != (geometry.tile_size, geometry.tile_size):
            raise ValueError(
                f"the preprocessor gives {preprocessor.output_size} images, the tiles are "
                f"{geometry.tile_size}x{geometry.tile_size}"
            )
        self.geometry = geometry
        self.preprocessor = preprocessor

    @classmethod
    def from_tower(
        cls, tower: VisionTower, pinpoints=None, max_tiles: int | None = None
    ) -> AnyResImageProcessor:
        return cls(anyres_geometry(tower, pinpoints, max_tiles), tower.preprocessor)

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Tokens of an image of (height, width), as the model's packed rows."""
        return self.geometry.num_image_tokens(image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> [1 + tiles, 3, S, S] float32."""
        return self.pixel_values([image])  # square S x S tiles pass its geometry as is

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Several images -> all their tiles `[sum of 1 + tiles, 3, S, S]`, image after image (the
        model splits them again by `image_sizes`, `model.anyres.pack_images`)."""
        tiles = [tile for image in images for tile in self.tiles(image)]  # a handful per image
        return self.preprocessor(tiles)  # one normalisation step; no image: [0, 3, S, S]

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The base tile and the grid's tiles, row by row, as S x S RGB images."""
        image = to_rgb(image)
        size, resample = self.geometry.tile_size, self.preprocessor.resample
        image_size = (image.height, image.width)
        target_h, target_w = select_best_resolution(image_size, self.geometry.pinpoints)
        new_h, new_w = resized_size(image_size, (target_h, target_w))
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))  # black, as LLaVA-NeXT pads
        resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), resample)
        canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
        base = image if image.size == (size, size) else image.resize((size, size), resample)
        boxes = [
            (left, top, left + size, top + size)
            for top in range(0, target_h, size)
            for left in range(0, target_w, size)
        ]  # a handful of tiles per image, not pixels
        return [base] + [canvas.crop(box) for box in boxes]
