"""Grounding boxes: the one parser on hand-made answers (malformed ones included), drawing,
conversions between Qwen-VL / LLaVA / COCO within one grid unit, `box_format` in a build, the
`dataprocess boxes` command and `test.py --draw_boxes` (the web chat's drawing)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from dataprocess.__main__ import main as dataprocess_main
from dataprocess.boxes import (
    PALETTE,
    Box,
    box_legend,
    coco_to_llava,
    coco_to_qwen,
    convert_box_text,
    draw_answer_boxes,
    draw_boxes,
    labelled_boxes,
    llava_boxes,
    llava_to_coco,
    llava_to_qwen,
    parse_boxes,
    qwen_to_coco,
    qwen_to_llava,
)
from dataprocess.build import build
from dataprocess.config import ConfigError, load_config
from dataprocess.reading import iter_raw_records
from dataprocess.schema import Record, Turn
from dataprocess.validate import text_problems

REPO = Path(__file__).resolve().parents[1]
APPLES = "<ref> Two apples</ref><box>(302,257),(582,671)</box><box>(603,252),(878,642)</box>"
MALFORMED = [
    "<box>(1,2)</box>",  # one corner
    "<box>(a,b),(c,d)</box>",
    "<box></box>",
    "<box>(500,500),(100,900)</box>",  # x1 > x2
    "<box>(0,0),(1000,10)</box>",  # off the grid
    "<box>(-1,0),(10,10)</box>",
    "<box>(1,2),(3,4)",  # never closed: plain text, not a box
    "<ref>dog</ref><box>(1,2),(3,4)",
    "</box><box>((1,2),(3,4))</box>",
]


def test_refs_name_the_boxes_right_after_them():
    text = (
        f"{APPLES} and <ref>自行车</ref> <box>(312,488),(655,902)</box>, "
        "<box>(1,1),(9,9)</box> <ref>cup</ref> on the left <box>(10,10),(20,20)</box>"
    )
    spans = parse_boxes(text)
    assert [(s.ref, s.box) for s in spans] == [
        ("Two apples", Box(302, 257, 582, 671)),
        ("Two apples", Box(603, 252, 878, 642)),
        ("自行车", Box(312, 488, 655, 902)),  # whitespace between ref and box is fine
        (None, Box(1, 1, 9, 9)),  # after other text: a box on its own
        (None, Box(10, 10, 20, 20)),  # "on the left" separates the ref from the box
    ]
    assert all(text[s.start : s.end] == f"<box>{s.body}</box>" for s in spans)
    assert [label for label, _ in labelled_boxes(text)] == [
        "1: Two apples", "2: Two apples", "3: 自行车", "4", "5"
    ]  # fmt: skip


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_boxes_are_text_and_never_raise(text):
    spans = parse_boxes(f"It is here: {text}.")
    assert all(s.box is None or s.kind == "box_out_of_range" for s in spans)
    assert labelled_boxes(text) == []
    assert draw_answer_boxes(Image.new("RGB", (32, 32)), text) is None
    assert len(box_legend(text)) == len(spans)  # each malformed box says why it was not drawn
    # the validator reports the same faults, by the same kinds
    record = Record("r", (), (Turn("user", "q"), Turn("assistant", text)))
    assert sorted(kind for kind, _ in text_problems(record)) == sorted(s.kind for s in spans)


def test_drawing_puts_the_box_where_the_grid_says():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    drawing = draw_boxes(image, [("1: cat", Box(500, 200, 900, 800))], min_side=100)
    assert drawing.size == (200, 100) and image.getpixel((0, 0)) == (255, 255, 255)
    assert drawing.getpixel((100, 60)) == PALETTE[0]  # the left edge: x = 0.5 * 200
    assert drawing.getpixel((179, 60)) == PALETTE[0]  # the right edge: x = 0.9 * 200 - 1
    assert drawing.getpixel((140, 60)) == (255, 255, 255)  # inside the box: untouched
    answer = "<ref>cat</ref><box>(500,200),(900,800)</box>"
    same = draw_answer_boxes(image, answer)
    assert same is not None and same.size == (896, 448)  # the short side scaled to 448
    assert draw_answer_boxes(image, "no boxes here") is None
    assert box_legend(answer) == ["1: cat (500,200),(900,800)"]


def test_qwen_grid_round_trips_through_llava_and_coco():
    for q in range(0, 999, 7):
        box = Box(q, q // 2, q + 1, 999 - q // 3)
        assert llava_to_qwen(qwen_to_llava(box)) == box
        for width, height in [(640, 480), (333, 517), (7, 5000)]:
            back = coco_to_qwen(qwen_to_coco(box, width, height), width, height)
            assert all(
                abs(a - b) <= 1
                for a, b in zip(vars(back).values(), vars(box).values(), strict=True)
            )
    for cents in range(0, 100):  # LLaVA's 2-decimal boxes survive Qwen's grid exactly
        f = cents / 100
        assert qwen_to_llava(llava_to_qwen([f, f, f, f]), digits=2) == [f, f, f, f]


def test_coco_pixels_round_trip_within_one_grid_unit():
    width, height = 640, 427
    for x, y, w, h in [
        (0, 0, 640, 427),
        (10.5, 20.25, 100, 50),
        (639, 426, 1, 1),
        (333, 1, 7, 400),
    ]:
        box = coco_to_qwen([x, y, w, h], width, height)
        x2, y2, w2, h2 = qwen_to_coco(box, width, height)
        assert abs(x2 - x) <= width / 1000 and abs(y2 - y) <= height / 1000
        assert abs((x2 + w2) - min(x + w, width * 0.999)) <= width / 1000
        assert llava_to_coco(coco_to_llava([x, y, w, h], width, height, 6), width, height) == (
            pytest.approx([x, y, w, h], abs=0.01)
        )
    assert coco_to_qwen([0, 0, 640, 427], width, height) == Box(0, 0, 999, 999)  # clipped to grid


def test_box_text_converts_both_ways():
    llava = "Region [0.28, 0.8, 0.48, 0.98] and [0, 0.1, .5, 1.0]; not a box: [2, 3, 4, 5]"
    qwen = convert_box_text(llava, "qwen")
    assert qwen == ("Region <box>(280,800),(480,980)</box> and <box>(0,100),(500,999)</box>; "
                    "not a box: [2, 3, 4, 5]")  # fmt: skip
    assert llava_boxes(llava) == [Box(280, 800, 480, 980), Box(0, 100, 500, 999)]
    back = convert_box_text("<ref>自行车</ref><box>(312,488),(655,902)</box>", "llava")
    assert back == "自行车 [0.312, 0.488, 0.655, 0.902]"
    assert convert_box_text(back, "qwen") == "自行车 <box>(312,488),(655,902)</box>"
    assert convert_box_text(APPLES, "keep") == APPLES
    with pytest.raises(ValueError, match="is not"):
        convert_box_text("<box>(1,2)</box>", "llava")
    with pytest.raises(ValueError, match="allowed"):
        convert_box_text("x", "pixels")


def _grounding_corpus(root: Path, box_format: str) -> Path:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 200, 200)).save(root / "images" / "a.png")
    llava = [{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the "
                                   "region this sentence describes: grey square."},
        {"from": "gpt", "value": "[0.1, 0.2, 0.5, 0.6]"}]}]  # fmt: skip
    qwen = [
        {"id": "q1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\n框出图中的方块"},
            {"from": "assistant", "value": "<ref>方块</ref><box>(100,200),(500,600)</box>"}]},
        {"id": "q2", "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nwhere?"},
            {"from": "assistant", "value": "<box>(100,200)</box>"}]},
    ]  # fmt: skip
    (root / "llava.json").write_text(json.dumps(llava), encoding="utf-8")
    (root / "qwen.json").write_text(json.dumps(qwen, ensure_ascii=False), encoding="utf-8")
    config = root / "build.yaml"
    config.write_text(
        "image_root: images\noutput: out/chat.json\nshuffle: false\nsources:\n"
        f"  - {{name: ll, format: llava, path: llava.json, box_format: {box_format}}}\n"
        f"  - {{name: qw, format: qwen_vl, path: qwen.json, box_format: {box_format}}}\n",
        encoding="utf-8",
    )
    return config


def test_box_format_rewrites_the_boxes_of_a_build(tmp_path):
    report = build(load_config(_grounding_corpus(tmp_path / "to_qwen", "qwen")), drop_invalid=True)
    records = {raw["id"]: raw for _, raw in iter_raw_records(Path(report["output"]))}
    assert records["ll_1"]["conversations"][1]["value"] == "<box>(100,200),(500,600)</box>"
    assert report["sources"]["ll"]["changes"]["converted_boxes"]["count"] == 1
    assert report["sources"]["qw"]["errors"]["bad_box"]["examples"] == ["qw_q2"]  # validator

    report = build(
        load_config(_grounding_corpus(tmp_path / "to_llava", "llava")), drop_invalid=True
    )
    records = {raw["id"]: raw for _, raw in iter_raw_records(Path(report["output"]))}
    assert records["qw_q1"]["conversations"][1]["value"] == "方块 [0.1, 0.2, 0.5, 0.6]"
    assert records["ll_1"]["conversations"][1]["value"] == "[0.1, 0.2, 0.5, 0.6]"
    assert report["sources"]["qw"]["errors"]["bad_box"]["examples"] == ["q2"]  # converter


@pytest.mark.parametrize(
    ("source", "words"),
    [("{name: a, format: llava, path: x, box_format: pixels}", "allowed: keep, qwen, llava"),
     ("{name: a, format: aic_captions, path: x, box_format: qwen}", "llava and qwen_vl")],
)  # fmt: skip
def test_box_format_config_errors(tmp_path, source, words):
    path = tmp_path / "bad.yaml"
    path.write_text(f"image_root: i\noutput: o.json\nsources:\n  - {source}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_boxes_command_draws_a_record(tmp_path, capsys):
    config = _grounding_corpus(tmp_path, "keep")
    report = build(load_config(config), drop_invalid=True)
    out = tmp_path / "drawn" / "q1.png"
    argv = ["boxes", "--data", report["output"], "--image_folder", str(tmp_path / "images")]
    assert dataprocess_main([*argv, "--id", "qw_q1", "--out", str(out)]) == 0
    image = Image.open(tmp_path / "images" / "a.png")
    expected = draw_answer_boxes(image, "<ref>方块</ref><box>(100,200),(500,600)</box>")
    assert ImageChops.difference(Image.open(out).convert("RGB"), expected).getbbox() is None
    assert dataprocess_main([*argv, "--id", "ll_1", "--out", str(tmp_path / "l.png")]) == 0  # LLaVA
    assert dataprocess_main([*argv, "--id", "nope", "--out", str(out)]) == 2
    assert "--id nope" in capsys.readouterr().err


def test_test_py_draws_what_the_web_chat_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("prompt_test", REPO / "test.py")
    prompt_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prompt_test)
    image = tmp_path / "shape.png"
    Image.new("RGB", (32, 32), (200, 200, 200)).save(image)
    answer = "<ref>circle</ref><box>(100,150),(600,700)</box>"
    args = argparse.Namespace(draw_boxes=str(tmp_path / "drawn"))
    prompt_test.draw_boxes(args, "shapes/test 1", image, answer)
    prompt_test.draw_boxes(args, "none", image, "a circle")  # no box: no file
    written = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert written == ["shapes_test_1.png"]
    expected = draw_answer_boxes(Image.open(image), answer)
    drawn = Image.open(tmp_path / "drawn" / written[0]).convert("RGB")
    assert ImageChops.difference(drawn, expected).getbbox() is None
