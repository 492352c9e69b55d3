"""AnyRes packing (model/anyres.py) against transformers' `LlavaNextForConditionalGeneration` on
the same tower, projector and LLM weights: image features, rows per image size, and logits."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from model.anyres import AnyResProjector, build_anyres_projector, pack_images
from qwen import splice_image_features
from tests.anyres_helpers import GEOMETRIES, hf_tower
from visual.anyres import AnyResImageProcessor, anyres_geometry

IMAGE_TOKEN_ID = 60
# (height, width) for the tiny 32 px tower: very wide (unpadding removes feature rows), very tall
# (removes columns), a 2x2 grid losing columns, a square, a 1x1-ish extreme
IMAGE_SIZES = [(10, 70), (70, 10), (100, 60), (64, 64), (1, 3)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _pair(family: str):
    """Our tower + AnyRes projector + a tiny Qwen2, and LlavaNext holding the same weights."""
    tower = hf_tower(family, 32, 8, hidden_size=16)
    processor = AnyResImageProcessor.from_tower(tower)
    torch.manual_seed(1)
    text_config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    llm = Qwen2ForCausalLM(text_config).eval()
    projector = AnyResProjector(tower.hidden_size, 32, processor.geometry)
    config = LlavaNextConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=text_config.to_dict(),
        image_grid_pinpoints=[list(p) for p in processor.geometry.pinpoints],
        vision_feature_select_strategy="default" if family == "clip" else "full",
        vision_feature_layer=tower.feature_layer,
        image_token_index=IMAGE_TOKEN_ID,
    )
    llava = LlavaNextForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(tower.model.state_dict())
    llava.model.multi_modal_projector.load_state_dict(
        {k: v for k, v in projector.state_dict().items() if k.startswith("linear_")}
    )
    llava.model.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    with torch.no_grad():
        llava.model.image_newline.copy_(projector.image_newline)
    return tower, processor, projector, llm, llava


def _our_rows(tower, processor, projector, images):
    pixel_values = torch.cat([processor.preprocess(image) for image in images])  # [tiles, 3, S, S]
    sizes = [(image.height, image.width) for image in images]
    with torch.no_grad():
        tiles = projector(tower(pixel_values))  # [tiles, N, Dl]
        return projector.pack(tiles, sizes), pixel_values, sizes


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_rows_equal_llava_next_image_features(family):
    tower, processor, projector, _, llava = _pair(family)
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(IMAGE_SIZES)]
    ours, pixel_values, sizes = _our_rows(tower, processor, projector, images)
    with torch.no_grad():
        theirs = llava.model.get_image_features(
            pixel_values=pixel_values, image_sizes=torch.tensor(sizes)
        ).pooler_output  # one [count, Dl] per image
    counts = [processor.num_image_tokens(size) for size in sizes]
    assert [t.shape[0] for t in theirs] == counts
    windows = [processor.geometry.feature_window(size) for size in sizes]
    assert windows[0][0] > 0 and windows[1][2] > 0  # unpadding removed rows, then columns
    assert ours.shape == (sum(counts), 32)
    assert (ours - torch.cat(theirs)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_logits_equal_llava_next(family):
    """Our LLM through `inputs_embeds`, the rows spliced at the placeholders, vs LlavaNext."""
    tower, processor, projector, llm, llava = _pair(family)
    images = [_image(10, 70, 0), _image(70, 10, 1)]
    rows, pixel_values, sizes = _our_rows(tower, processor, projector, images)
    counts = [processor.num_image_tokens(size) for size in sizes]
    ids = [3, 4] + [IMAGE_TOKEN_ID] * counts[0] + [5] + [IMAGE_TOKEN_ID] * counts[1] + [6, 7]
    input_ids = torch.tensor([ids])  # [1, T]
    with torch.no_grad():
        embeds = splice_image_features(
            llm.get_input_embeddings()(input_ids), input_ids, rows, IMAGE_TOKEN_ID
        )
        ours = llm(inputs_embeds=embeds).logits
        theirs = llava(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes)
        ).logits
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}-{g[2]}")
def test_rows_always_equal_the_placeholder_count(geometry):
    """Property test over random sizes: `pack_images` gives `num_image_tokens` rows per image."""
    tower = hf_tower(*geometry)
    anyres = anyres_geometry(tower)
    rng = random.Random(11)
    sizes = [(rng.randint(1, 2500), rng.randint(1, 2500)) for _ in range(25)]
    sizes += [(1, 1), (768, 767), (1, 4000), (4000, 1)]
    tiles = [anyres.num_tiles(size) for size in sizes]
    features = torch.randn(sum(tiles), anyres.base_tokens, 4)  # [tiles, N, Dl]
    rows = pack_images(features, sizes, anyres, torch.zeros(4))
    assert rows.shape[0] == sum(anyres.num_image_tokens(size) for size in sizes)


def test_newline_and_base_rows_are_where_llava_next_puts_them():
    tower = hf_tower("clip", 32, 8)
    anyres = anyres_geometry(tower)
    size = (64, 64)  # 2x2 tiles of 4x4 features, nothing unpadded: 8 rows of 8 + newline
    features = torch.arange(5 * 16, dtype=torch.float32).view(5, 16, 1)  # feature = its index
    rows = pack_images(features, [size], anyres, torch.tensor([-1.0]))[:, 0]
    assert rows[:16].tolist() == list(range(16))  # the base tile first
    grid = rows[16:].view(8, 9)
    assert (grid[:, 8] == -1).all()  # a newline closes every feature row
    # the first feature row: tile 1's first row, then tile 2's first row
    assert grid[0, :8].tolist() == [16, 17, 18, 19, 32, 33, 34, 35]
    assert grid[4, :4].tolist() == [48, 49, 50, 51]  # the second tile row starts with tile 3


def test_image_newline_is_saved_and_loaded_with_the_projector(tmp_path):
    from safetensors.torch import save_file

    from model.checkpoint import PROJECTOR_FILE, load_state, read_safetensors

    geometry = anyres_geometry(hf_tower("clip", 32, 8))
    projector = AnyResProjector(16, 32, geometry)
    assert (
        abs(float(projector.image_newline.detach().std()) - 32**-0.5) < 0.1
    )  # LLaVA-NeXT's init scale
    save_file(projector.state_dict(), tmp_path / PROJECTOR_FILE)
    loaded = AnyResProjector(16, 32, geometry)
    load_state(loaded, read_safetensors(tmp_path / PROJECTOR_FILE), tmp_path / PROJECTOR_FILE)
    assert torch.equal(loaded.image_newline, projector.image_newline)
    assert "image_newline" in dict(projector.named_parameters())


def test_bad_inputs_are_refused():
    geometry = anyres_geometry(hf_tower("clip", 32, 8))
    with pytest.raises(ValueError, match="--projector_type resampler cannot be used"):
        build_anyres_projector("resampler", 16, 32, geometry)
    with pytest.raises(ValueError, match=r"need 4 tiles .* features of 5 tiles"):
        pack_images(torch.zeros(5, 16, 4), [(70, 10)], geometry, torch.zeros(4))
