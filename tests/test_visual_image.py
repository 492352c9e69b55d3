"""Image decoding (odd modes, sizes, EXIF, corrupt files) and preprocessing arithmetic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visual import ImageLoadError, ImagePreprocessor, load_image
from visual.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    preprocessor_from_hf_dict,
)

CLIP_PRE = ImagePreprocessor(
    mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, shortest_edge=32, crop_size=(32, 32)
)


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, max(width, 1), dtype=np.float64)[None, :]
    y = np.linspace(0, 255, max(height, 1), dtype=np.float64)[:, None]
    return (x * 0.5 + y * 0.5).astype(np.uint8)  # [H, W]


def _odd_images() -> dict[str, tuple[Image.Image, str]]:
    """name -> (image, file suffix able to hold its mode)."""
    grey = _gradient(40, 30)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    rgba = np.concatenate([rgb, grey[..., None]], axis=-1)
    transparent_p = Image.fromarray(rgb).convert("P")
    transparent_p.info["transparency"] = 0
    return {
        "RGB": (Image.fromarray(rgb), ".png"),
        "RGBA": (Image.fromarray(rgba), ".png"),
        "LA": (Image.fromarray(grey).convert("LA"), ".png"),
        "P": (Image.fromarray(rgb).convert("P"), ".png"),
        "P-transparent": (transparent_p, ".png"),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), ".jpg"),
        "L": (Image.fromarray(grey), ".png"),
        "1": (Image.fromarray(grey).convert("1"), ".png"),
        "I;16": (Image.fromarray(grey.astype(np.uint16) * 257), ".png"),
        "I": (Image.fromarray(grey.astype(np.int32) * 200), ".tif"),
        "F": (Image.fromarray(grey.astype(np.float32) / 255), ".tif"),
        "YCbCr": (Image.fromarray(rgb).convert("YCbCr"), ".jpg"),
        "1x1": (Image.new("RGB", (1, 1), (10, 20, 30)), ".png"),
        "1x300": (Image.new("L", (1, 300), 77), ".png"),
        "300x1": (Image.new("RGB", (300, 1), (1, 2, 3)), ".bmp"),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
@pytest.mark.parametrize("aspect", ["resize", "pad"])
def test_every_odd_mode_and_size_loads_and_preprocesses(tmp_path: Path, name: str, aspect: str):
    image, suffix = _odd_images()[name]
    path = tmp_path / f"img{suffix}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.size == image.size
    pre = ImagePreprocessor(
        mean=SIGLIP_MEAN, std=SIGLIP_STD, resize_size=(24, 24), pad_to_square=aspect == "pad"
    )
    for preprocessor in (pre, CLIP_PRE):
        pixels = preprocessor([loaded])
        assert pixels.dtype == torch.float32
        assert pixels.shape == (1, 3, *preprocessor.output_size)
        assert torch.isfinite(pixels).all()


def test_alpha_is_composited_on_white(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent except one opaque pixel
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pixels = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert tuple(pixels[3, 3]) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0]
    assert pixels.tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 5, 10))  # red strip on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.size == (10, 20)
    top_row = np.asarray(loaded)[0]  # after a clockwise turn the left strip is on top
    assert top_row[:, 0].min() > 200 and top_row[:, 2].max() < 60


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.stack([_gradient(64, 64)] * 3, axis=-1)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.jpg", b"\x00\x01definitely not an image" * 10),
        ("notes.png", b"just some text\n"),
        ("truncated.jpg", _jpeg_bytes()[:200]),
        ("empty.png", b""),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes
):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=name) as info:
        load_image(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_raises_image_load_error(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="nothing.jpg"):
        load_image(tmp_path / "nothing.jpg")


def test_pad_to_square_keeps_aspect_ratio_and_pads_with_mean_colour():
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    wide.paste((0, 0, 255), (32, 0, 64, 16))  # left half red, right half blue
    padded = ImagePreprocessor(
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        shortest_edge=32,
        crop_size=(32, 32),
        pad_to_square=True,
    )
    pixels = padded([wide])[0]  # [3, 32, 32]; the band occupies rows 12..19
    mean_colour_error = torch.tensor(
        [
            (int(m * 255) / 255 - m) / s
            for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)
        ]
    ).view(3, 1, 1)
    for rows in (slice(0, 10), slice(22, 32)):
        assert torch.allclose(
            pixels[:, rows], mean_colour_error.expand_as(pixels[:, rows]), atol=1e-4
        )
    red = torch.tensor(
        [(1 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0], -OPENAI_CLIP_MEAN[1] / OPENAI_CLIP_STD[1]]
    )
    assert torch.allclose(pixels[:2, 16, 2], red, atol=0.05)  # left of the band stays red
    assert pixels[2, 16, 30] > 1.5  # right of the band stays blue
    # Without padding the same image fills the whole frame: no mean-colour rows.
    cropped = CLIP_PRE([wide])[0]
    assert cropped[:, 0].abs().mean() > 1.0


def test_matches_transformers_pil_image_processors():
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    clip_config = {
        "size": {"shortest_edge": 56},
        "crop_size": {"height": 56, "width": 56},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    siglip_config = {
        "size": {"height": 48, "width": 48},
        "resample": 2,
        "image_mean": list(SIGLIP_MEAN),
        "image_std": list(SIGLIP_STD),
    }
    for config, reference_class in (
        (clip_config, CLIPImageProcessorPil),
        (siglip_config, SiglipImageProcessorPil),
    ):
        ours = preprocessor_from_hf_dict(config, "resize", "test")([image])
        reference = reference_class(**config)(images=[image], return_tensors="pt")["pixel_values"]
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, atol=1e-5)


def test_bad_aspect_ratio_flag_names_the_flag():
    with pytest.raises(ValueError, match="image_aspect_ratio='crop'"):
        preprocessor_from_hf_dict(
            {"size": {"height": 8, "width": 8}, "image_mean": [0] * 3, "image_std": [1] * 3},
            "crop",
            "x",
        )
