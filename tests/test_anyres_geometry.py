"""AnyRes geometry (visual/anyres.py) against transformers' LLaVA-NeXT processor: token counts for
many image sizes and towers, pixel values on the same image, and the refusals."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.anyres_helpers import (
    GEOMETRIES,
    IMAGE_TOKEN,
    hf_tower,
    reference_image_processor,
    reference_processor,
)
from visual.anyres import (
    AnyResImageProcessor,
    anyres_geometry,
    check_pinpoints,
    default_pinpoints,
    select_best_resolution,
)

# (height, width): 1x1-ish extremes, off-by-ones around tile multiples (transformers#33501's
# 768x767), very wide and very tall, ordinary photos.
SIZES = [
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 1000), (1000, 1), (2, 5000), (5000, 2),
    (3, 2000), (2000, 3), (768, 767), (767, 768), (768, 768), (336, 336), (337, 336),
    (335, 336), (336, 337), (672, 671), (671, 672), (1008, 335), (335, 1008), (100, 5000),
    (5000, 100), (480, 640), (640, 480), (1080, 1920), (1920, 1080), (999, 1001), (33, 31),
    (31, 33), (64, 65), (65, 64), (32, 96), (96, 32), (384, 383), (383, 384), (4000, 3000),
    # the kept feature rows come out as 2.9999999999999996 and the like: transformers rounds to 7
    # places before truncating (found by search, for 336, 384 and 32 px tiles)
    (47, 1128), (55, 176), (47, 423), (49, 49), (47, 188), (49, 588),
]  # fmt: skip


def _random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}-{g[2]}")
def tower(request):
    return hf_tower(*request.param)


def test_default_pinpoints_are_llava_next_for_336():
    expected = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert [list(p) for p in default_pinpoints(336)] == expected


def test_token_counts_equal_llava_next_processor(tower):
    geometry = anyres_geometry(tower)
    assert geometry.base_tokens == tower.num_image_tokens
    reference = reference_processor(tower, geometry.pinpoints)
    theirs = reference._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    ours = [geometry.num_image_tokens(size) for size in SIZES]
    assert len(SIZES) >= 30
    assert ours == theirs


def test_token_counts_random_sizes_and_pinpoints(tower):
    """Property test: random sizes, and random pinpoint lists (any multiples of the tile)."""
    rng = random.Random(7)
    side = tower.image_size
    for _trial in range(5):
        pinpoints = [
            (side * rng.randint(1, 4), side * rng.randint(1, 4)) for _ in range(rng.randint(1, 6))
        ]
        geometry = anyres_geometry(tower, pinpoints)
        sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(40)]
        reference = reference_processor(tower, geometry.pinpoints)
        theirs = reference._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        assert [geometry.num_image_tokens(size) for size in sizes] == theirs, pinpoints


def test_max_image_tokens_bounds_every_size(tower):
    geometry = anyres_geometry(tower)
    rng = random.Random(3)
    sizes = SIZES + [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(200)]
    sizes += [(h * 7, w * 7) for h, w in geometry.pinpoints]  # a pinpoint's exact shape
    counts = [geometry.num_image_tokens(size) for size in sizes]
    assert max(counts) == geometry.max_image_tokens()


@pytest.mark.parametrize("size", [(20, 70), (70, 20), (33, 31), (1, 90), (64, 64), (100, 40)])
def test_tiny_processor_expands_the_prompt_to_our_count(size):
    """The full `LlavaNextProcessor` call on a real image: placeholders in the expanded prompt."""
    tower = hf_tower("clip", 32, 8)
    processor = AnyResImageProcessor.from_tower(tower)
    reference = reference_processor(tower, processor.geometry.pinpoints)
    image = _random_image(*size)
    out = reference(text=f"{IMAGE_TOKEN} hi", images=image, return_tensors="pt")
    placeholders = int((out["input_ids"] == reference.image_token_id).sum())
    assert placeholders == processor.num_image_tokens(size)
    assert out["image_sizes"].tolist() == [list(size)]


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("size", [(20, 70), (70, 20), (90, 91), (5, 200), (32, 32), (50, 64)])
def test_pixel_values_equal_llava_next_pil_backend(family, size):
    tower = hf_tower(family, 32, 8)
    processor = AnyResImageProcessor.from_tower(tower)
    image = _random_image(*size, seed=size[0])
    ours = processor.preprocess(image)  # [1 + tiles, 3, S, S]
    reference = reference_image_processor(tower, processor.geometry.pinpoints, backend="pil")
    theirs = reference(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (processor.geometry.num_tiles(size), 3, 32, 32)
    # the same PIL resampling: only float rounding of the normalisation differs
    assert (ours - theirs).abs().max() <= 1e-6


def test_pixel_values_vs_torchvision_backend_differ_only_by_resampling():
    """`LlavaNextImageProcessor` (torchvision) resamples tensors, not PIL images: the same layout
    and padding, values apart by the resampling only (0.015 after normalising on this image; up to
    0.18 on random-noise images of other sizes, the worst case for bicubic kernels). The export
    writes the PIL backend, which is equal to ours."""
    tower = hf_tower("clip", 32, 8)
    processor = AnyResImageProcessor.from_tower(tower)
    image = _random_image(50, 70)
    ours = processor.preprocess(image)
    reference = reference_image_processor(tower, processor.geometry.pinpoints, backend="torch")
    theirs = reference(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 0.1


def test_best_resolution_ties_and_waste():
    pinpoints = [(32, 64), (64, 32), (64, 64)]
    assert select_best_resolution((10, 10), pinpoints) == (32, 64)  # equal effect: first listed
    assert select_best_resolution((100, 100), pinpoints) == (64, 64)  # most pixels kept
    assert select_best_resolution((30, 60), [(64, 64), (32, 64)]) == (32, 64)  # least wasted


def test_max_tiles_drops_larger_pinpoints():
    tower = hf_tower("clip", 336, 14)
    geometry = anyres_geometry(tower, max_tiles=2)
    assert geometry.pinpoints == ((336, 672), (672, 336))
    assert geometry.max_image_tokens() <= 2048 - 256  # leaves room for text in a 2048 sample
    with pytest.raises(ValueError, match="--image_max_tiles 0"):
        anyres_geometry(tower, max_tiles=0)
    with pytest.raises(ValueError, match="--image_max_tiles 1 leaves none"):
        anyres_geometry(tower, [(672, 672)], max_tiles=1)


@pytest.mark.parametrize(
    "pinpoints, message",
    [
        ([], "--image_grid_pinpoints is empty"),
        ([(32, 48)], r"--image_grid_pinpoints: \[32, 48\] is not a multiple of .* 32"),
        ([(32,)], r"--image_grid_pinpoints: \(32,\) is not a \[height, width\] pair"),
        ([(32, 64, 96)], "is not a .height, width. pair"),
        ([(0, 32)], "is not a .height, width. pair of positive"),
        ([("32", 64)], "is not a .height, width. pair"),
        ("32x64", "expected a list of"),
    ],
)
def test_bad_pinpoints_are_refused_naming_the_flag(pinpoints, message):
    with pytest.raises(ValueError, match=message):
        check_pinpoints(pinpoints, 32)


def test_a_tower_without_a_patch_grid_is_refused():
    tower = hf_tower("clip", 32, 8)
    tower.patch_grid = None  # as Qwen-VL's resampled tower reports it
    with pytest.raises(ValueError, match="anyres needs a tower whose tokens are a patch grid"):
        anyres_geometry(tower)


def test_loaded_towers_report_their_patch_grid(tmp_path):
    from demo.tiny_towers import save_tiny_siglip_tower
    from visual import load_vision_tower

    tower = load_vision_tower(str(save_tiny_siglip_tower(tmp_path / "s", 32, 8)))
    assert tower.patch_grid == (4, 4)
    assert anyres_geometry(tower).base_tokens == 16 == tower.num_image_tokens
    assert torch.is_tensor(AnyResImageProcessor.from_tower(tower).preprocess(_random_image(9, 9)))
