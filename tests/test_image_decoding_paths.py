"""One image decoder for every path: a 16-bit PNG, a transparent PNG and an EXIF-rotated JPEG give
the pixels training sees (`visual.load_image`) in evaluation, `dataprocess images` and
`dataprocess boxes` too, and no other module decodes images its own way."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataprocess.boxes import draw_record_boxes
from dataprocess.process_image import process_images
from dataprocess.schema import parse_record
from dataprocess.validate import check_image
from runtime.evaluation.questions import decode_image
from visual import load_image

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 480, 456  # short side over draw_boxes' 448, so drawing does not rescale


def _sixteen_bit(path: Path) -> None:
    ramp = np.linspace(0, 65535, WIDTH * HEIGHT).reshape(HEIGHT, WIDTH).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # a 16-bit grey PNG


def _transparent(path: Path) -> None:
    rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)  # transparent black
    rgba[: HEIGHT // 2, :, :] = (200, 30, 30, 255)  # top half opaque red
    rgba[HEIGHT // 2 :, : WIDTH // 2, :] = (30, 30, 200, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(path)


def _exif_rotated(path: Path) -> None:
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:, : WIDTH // 2] = (220, 20, 20)
    pixels[:, WIDTH // 2 :] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())


MAKERS = {"deep.png": _sixteen_bit, "alpha.png": _transparent, "rotated.jpg": _exif_rotated}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("images")
    for name, make in MAKERS.items():
        make(images / name)
    return images


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int16)


def test_the_decoder_itself_honours_depth_alpha_and_orientation(folder):
    deep = _pixels(load_image(folder / "deep.png"))
    assert deep[0, 0].tolist() == [0, 0, 0] and deep[-1, -1].tolist() == [255, 255, 255]
    assert abs(int(deep.mean()) - 127) <= 2  # a ramp, not near white
    alpha = _pixels(load_image(folder / "alpha.png"))
    assert alpha[-1, -1].tolist() == [255, 255, 255]  # transparent -> white, as in training
    rotated = load_image(folder / "rotated.jpg")
    assert rotated.size == (HEIGHT, WIDTH)
    top = _pixels(rotated)[0].mean(axis=0)
    assert top[0] > 150 and top[2] < 100  # the left (red) half became the top


@pytest.mark.parametrize("name", list(MAKERS))
def test_evaluation_embedded_images_decode_like_training(folder, name):
    embedded = decode_image((folder / name).read_bytes(), "q1")
    assert np.array_equal(_pixels(embedded), _pixels(load_image(folder / name)))


@pytest.mark.parametrize("name", list(MAKERS))
def test_dataprocess_images_resizes_the_training_pixels(folder, tmp_path, name):
    data = tmp_path / "chat.json"
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    data.write_text(json.dumps([{"id": "r", "image": name, "conversations": turns}]), "utf-8")
    cache = tmp_path / "cache"
    summary = process_images(data, folder, cache, size=min(WIDTH, HEIGHT), workers=1)
    assert summary["resized"] == 1
    with Image.open(cache / name) as cached:
        got = _pixels(cached.convert("RGB"))
    want = _pixels(load_image(folder / name))
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 2  # the cache re-encodes a JPEG (quality 95)


@pytest.mark.parametrize("name", list(MAKERS))
def test_dataprocess_boxes_draws_on_the_training_pixels(folder, name):
    raw = {
        "id": "r",
        "image": name,
        "conversations": [
            {"from": "human", "value": "<image>\nWhere?"},
            {"from": "gpt", "value": "<ref>it</ref><box>(0,0),(100,100)</box>"},
        ],
    }
    [(index, drawing)] = draw_record_boxes(parse_record(raw), folder)
    want = _pixels(load_image(folder / name))
    got = _pixels(drawing)
    assert index == 0 and got.shape == want.shape
    # The box and its label sit in the top-left tenth; elsewhere the pixels are untouched.
    assert np.array_equal(got[HEIGHT // 3 :, WIDTH // 3 :], want[HEIGHT // 3 :, WIDTH // 3 :])


@pytest.mark.parametrize("name", list(MAKERS))
def test_validate_accepts_what_training_decodes(folder, name):
    assert check_image(folder, name).status == "ok"


# Opening an image file is allowed outside the decoder only to check it, never to use its pixels.
CHECK_ONLY = {
    "dataprocess/validate.py": "verify",
    "runtime/evaluation/questions.py": "verify",
    "runtime/serve/media.py": "header",
    "runtime/web/chat.py": "header",
}


def test_no_module_decodes_images_its_own_way():
    found = {}
    for package in ("dataprocess", "dataset", "visual", "model", "runtime", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            relative = path.relative_to(ROOT).as_posix()
            if relative == "visual/image_io.py":
                continue
            if re.search(r"Image\.open\(|exif_transpose|\.convert\(\"RGB\"\)", text):
                found[relative] = text
    assert sorted(found) == sorted(CHECK_ONLY)
    for relative in CHECK_ONLY:
        assert "exif_transpose" not in found[relative]
        assert '.convert("RGB")' not in found[relative]
