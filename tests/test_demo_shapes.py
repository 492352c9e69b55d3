"""The generated shapes data set: deterministic, valid records, answers that match the pixels."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataprocess.schema import parse_record
from demo import shapes
from demo.shapes import COLORS, POSITIONS, SHAPES, ShapeSpec, draw_spec, generate_shapes_dataset

# English answer of every attribute value, by its Chinese answer too.
_ANSWERS = {
    **{name: ("color", name) for name in COLORS},
    **{zh: ("color", name) for name, (_, zh) in COLORS.items()},
    **{name: ("shape", name) for name in SHAPES},
    **{zh: ("shape", name) for name, zh in SHAPES.items()},
    **{name: ("position", name) for name in POSITIONS},
    **{zh: ("position", name) for name, (_, zh) in POSITIONS.items()},
}


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=120, num_test=30)


def test_deterministic_for_a_seed(generated: Path, tmp_path: Path):
    again = generate_shapes_dataset(tmp_path / "again", num_train=120, num_test=30)
    assert _digest(again) == _digest(generated)
    other = generate_shapes_dataset(tmp_path / "other", num_train=120, num_test=30, seed=1)
    assert json.loads((other / "train.json").read_text()) != json.loads(
        (generated / "train.json").read_text()
    )


def test_records_are_valid_llava_records(generated: Path):
    train = json.loads((generated / "train.json").read_text(encoding="utf-8"))
    test = json.loads((generated / "test.json").read_text(encoding="utf-8"))
    assert (len(train), len(test)) == (120, 30)
    records = [parse_record(raw, source="train.json", index=i) for i, raw in enumerate(train)]
    assert len({r.id for r in records}) == 120
    assert all((generated / r.images[0]).is_file() for r in records)
    assert {r.turns[0].content.startswith("<image>\n") for r in records} == {True}
    questions = " ".join(r.turns[0].content for r in records)
    assert "color" in questions and "颜色" in questions  # both languages appear
    turns = [len(r.turns) // 2 for r in records]
    assert set(turns) == {1, 2, 3} and 0.15 < sum(t > 1 for t in turns) / len(turns) < 0.45
    for record in records:  # follow-ups ask about other attributes, so their answers differ
        answers = [t.content for t in record.turns if t.role == "assistant"]
        assert len({_ANSWERS[a][0] for a in answers}) == len(answers), record.id
        assert all("<image>" not in t.content for t in record.turns[1:]), record.id


def _shape_mask(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return pixels.min(axis=2) < 100  # every colour has a channel far below the grey background


def _classify_shape(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    corners = [box[0, 0], box[0, -1], box[-1, 0], box[-1, -1]]
    if box[-1].all() and not box[0, 0]:
        return "triangle"
    if not any(corners) and box[box.shape[0] // 2].all() and fill < 0.65:
        return "cross"
    return "circle"


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_the_pixels(generated: Path, split: str):
    records = json.loads((generated / f"{split}.json").read_text(encoding="utf-8"))
    answers = [(r, turn["value"]) for r in records for turn in r["conversations"][1::2]]
    for record, answer in answers:
        image = Image.open(generated / record["image"]).convert("RGB")
        mask = _shape_mask(image)
        attribute, value = _ANSWERS[answer]
        if attribute == "color":
            colours = {tuple(p) for p in np.asarray(image)[mask]}
            assert colours == {COLORS[value][0]}, record["id"]
        elif attribute == "shape":
            assert _classify_shape(mask) == value, record["id"]
        else:
            rows, cols = np.nonzero(mask)
            half = image.size[0] / 2
            quadrant = (int(cols.mean() >= half), int(rows.mean() >= half))
            assert quadrant == POSITIONS[value][0], record["id"]


def test_centre_pixel_has_the_shape_colour():
    rng = random.Random(3)
    for _ in range(200):
        spec = shapes.sample_spec(rng, 32)
        image = draw_spec(spec, 32, noise=None)
        assert image.getpixel(spec.center) == COLORS[spec.color][0], spec
        x0, y0, x1, y1 = spec.box
        assert 0 <= x0 < x1 < 32 and 0 <= y0 < y1 < 32
        column, row = POSITIONS[spec.position][0]
        assert (x0 // 16, y0 // 16, x1 // 16, y1 // 16) == (column, row, column, row)


def test_every_shape_classifies(tmp_path: Path):
    for name in SHAPES:
        image = draw_spec(ShapeSpec("blue", name, "top left", (2, 2, 13, 13)), 32, noise=None)
        assert _classify_shape(_shape_mask(image)) == name


def test_rerun_with_same_parameters_is_skipped(tmp_path: Path):
    out = generate_shapes_dataset(tmp_path, num_train=5, num_test=2)
    stamp = (out / "train.json").stat().st_mtime_ns
    generate_shapes_dataset(tmp_path, num_train=5, num_test=2)
    assert (out / "train.json").stat().st_mtime_ns == stamp
    generate_shapes_dataset(tmp_path, num_train=6, num_test=2)
    assert len(json.loads((out / "train.json").read_text())) == 6
    assert json.loads((out / "manifest.json").read_text())["num_train"] == 6


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    shapes.main(["--out", str(tmp_path / "cli"), "--num-train", "3", "--num-test", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 4
