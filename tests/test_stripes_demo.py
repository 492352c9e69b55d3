"""The high-resolution demo data (demo/stripes.py): the answer is in the full-resolution tiles
AnyRes feeds the tower, and gone from the one downscaled tile a fixed grid feeds it."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from demo.stripes import ORIENTATIONS, draw_stripes, generate_stripes_dataset
from runtime.config import load_config
from visual import load_vision_tower
from visual.anyres import AnyResImageProcessor
from visual.processing import FixedGridProcessor

COLOURS = ((230, 20, 20), (20, 20, 230))


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    return generate_stripes_dataset(tmp_path_factory.mktemp("stripes"), 24, 8, seed=3)


def test_records_ask_the_orientation_of_stripes_twice_the_tower_size(stripes):
    records = json.loads((stripes / "train.json").read_text())
    assert len(records) == 24
    answers = [record["conversations"][1]["value"] for record in records]
    assert set(answers) == set(ORIENTATIONS)  # both occur
    for record, answer in zip(records, answers, strict=True):
        image = Image.open(stripes / record["image"]).convert("RGB")
        assert image.size == (64, 64)
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float).view(64, 64, 3)
        along = 1 if answer == "horizontal" else 0  # horizontal stripes are constant along a row
        assert (
            pixels.diff(dim=along).abs().max() == 0 and pixels.diff(dim=1 - along).abs().max() > 0
        )
    assert generate_stripes_dataset(stripes, 24, 8, seed=3) == stripes  # same parameters: no-op


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_one_tile_cannot_tell_the_orientation_but_anyres_tiles_can(tiny_clip_dir, aspect):
    images = [draw_stripes(o, 64, COLOURS, 0) for o in ORIENTATIONS]
    anyres_tower = load_vision_tower(str(tiny_clip_dir), image_aspect_ratio="anyres")
    tiles = AnyResImageProcessor.from_tower(anyres_tower).pixel_values(images)
    assert tiles.shape == (2 * 5, 3, 32, 32)  # base tile + 2 x 2 tiles per image
    span = tiles.max() - tiles.min()  # the two colours' normalised range
    grid = tiles.view(2, 5, 3, 32, 32)[:, 1:]  # the full-resolution tiles
    assert (grid[0] - grid[1]).abs().mean() > 0.25 * span  # every pixel flips colour
    fixed_tower = load_vision_tower(str(tiny_clip_dir), image_aspect_ratio=aspect)
    fixed = FixedGridProcessor(fixed_tower.preprocessor, fixed_tower.num_image_tokens)
    one_tile = fixed.pixel_values(images)  # [2, 3, 32, 32]
    # downscaled, both orientations are the same flat colour (within resampling ripples)
    assert (one_tile[0] - one_tile[1]).abs().mean() < 0.02 * span
    base = tiles.view(2, 5, 3, 32, 32)[:, 0]  # AnyRes's own squashed tile is as blind
    assert (base[0] - base[1]).abs().mean() < 0.02 * span


def test_the_high_resolution_demo_recipe_trains_anyres():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo_hires.yaml")
    assert config.vision.image_aspect_ratio == "anyres"
    assert config.data.data_path == "demo_assets/stripes/train.json"
