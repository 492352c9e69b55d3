"""Each converter gives exactly the expected records from a small fixture in its source format."""

from __future__ import annotations

import json
from pathlib import Path

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import Record, Turn
from dataprocess.sources import converter_for
from dataprocess.sources.common import choose_prompt


def _run(fmt: str, path: Path, **options: object) -> tuple[list[Record], Tally]:
    source = SourceConfig(name="src", format=fmt, paths=(path,), **options)  # type: ignore[arg-type]
    tally = Tally("src")
    return list(converter_for(fmt)(source, tally)), tally


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _kinds(tally: Tally, section: str = "errors") -> list[tuple[str, str | None]]:
    return [(i.kind, i.record_id) for i in getattr(tally, section)]


def test_llava_verbatim_with_int_id_text_only_and_bad_record(tmp_path: Path) -> None:
    data = [
        {
            "id": 2367401,
            "image": "gqa/images/2367401.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nLeft or right?\nAnswer briefly."},
                {"from": "gpt", "value": "Right"},
                {"from": "human", "value": "Color?"},
                {"from": "gpt", "value": "White"},
            ],
        },
        {
            "id": "wg_0",
            "model": "",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
        },
        {
            "id": "bad",
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        },
    ]
    path = _write(tmp_path / "mix.json", data)
    records, tally = _run("llava", path)
    assert records == [
        Record(
            "2367401",
            ("gqa/images/2367401.jpg",),
            (
                Turn("user", "<image>\nLeft or right?\nAnswer briefly."),
                Turn("assistant", "Right"),
                Turn("user", "Color?"),
                Turn("assistant", "White"),
            ),
            str(path),
        ),
        Record("wg_0", (), (Turn("user", "Hi"), Turn("assistant", "Yo")), str(path)),
    ]
    assert _kinds(tally) == [("image_count_mismatch", "bad")]
    assert tally.counts["read"] == 3


def test_qwen_vl_pictures_boxes_and_leading_assistant(tmp_path: Path) -> None:
    data = [
        {
            "id": "identity_1",
            "conversations": [
                {"from": "assistant", "value": "Hello."},
                {
                    "from": "user",
                    "value": "Picture 1:<img>a.jpg</img>\nPicture 2: <img>b.png</img>\nDiffer?",
                },
                {"from": "assistant", "value": "Yes."},
                {"from": "user", "value": "Picture 3: <img>c.jpg</img>\nBox the cat"},
                {"from": "assistant", "value": "<ref>cat</ref><box>(10,20),(500,999)</box>"},
            ],
        },
        {
            "id": "identity_2",
            "conversations": [
                {"from": "user", "value": "Hi"},
                {"from": "assistant", "value": "Hey"},
            ],
        },
        {
            "id": "identity_3",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>https://x.org/a.jpg</img>\nQ"},
                {"from": "assistant", "value": "A"},
            ],
        },
    ]
    path = _write(tmp_path / "qwen.json", data)
    records, tally = _run("qwen_vl", path)
    assert records == [
        Record(
            "identity_1",
            ("a.jpg", "b.png", "c.jpg"),
            (
                Turn("user", "<image>\n<image>\nDiffer?"),
                Turn("assistant", "Yes."),
                Turn("user", "<image>\nBox the cat"),
                Turn("assistant", "<ref>cat</ref><box>(10,20),(500,999)</box>"),
            ),
            str(path),
        ),
        Record("identity_2", (), (Turn("user", "Hi"), Turn("assistant", "Hey")), str(path)),
    ]
    assert _kinds(tally, "changes") == [("dropped_leading_assistant_turn", "identity_1")]
    assert _kinds(tally) == [("image_url", "identity_3")]


def test_aic_captions_keeps_every_caption_with_seeded_prompts(tmp_path: Path) -> None:
    image_id = "3a9c41d7e2b0f8c6a1d5e9f0b7c3a2d4e6f81b90.jpg"
    captions = ["两个男人踢足球", "一个女人在做饭\n", " 屋子里有人\n在准备食物", "", "草坪上有人"]
    path = _write(
        tmp_path / "caption_train_annotations_20170902.json",
        [{"url": "u", "image_id": image_id, "caption": captions}],
    )
    prompts = ("这幅图像描述了什么？", "图中有什么？", "请描述这张图片。")
    records, tally = _run("aic_captions", path, prompts=prompts, seed=7)
    stem = image_id[:-4]
    expected = ["两个男人踢足球", "一个女人在做饭", "屋子里有人\n在准备食物", None, "草坪上有人"]
    kept = [(k, text) for k, text in enumerate(expected) if text is not None]
    assert [r.id for r in records] == [f"{stem}_{k}" for k, _ in kept]
    for record, (k, text) in zip(records, kept, strict=True):
        assert record.images == (image_id,)
        prompt = choose_prompt(prompts, 7, f"{stem}_{k}")
        assert record.turns == (Turn("user", f"<image>\n{prompt}"), Turn("assistant", text))
    assert _kinds(tally, "changes") == [("dropped_empty_caption", f"{stem}_3")]
    # The same seed gives the same prompts; the draw is not constant across records.
    again, _ = _run("aic_captions", path, prompts=prompts, seed=7)
    assert again == records
    many = [choose_prompt(prompts, 7, f"id{i}") for i in range(40)]
    assert len(set(many)) == len(prompts)


def test_aic_join_lines_option_is_logged(tmp_path: Path) -> None:
    path = _write(tmp_path / "aic.json", [{"image_id": "x.jpg", "caption": ["a\nb", "c"]}])
    records, tally = _run("aic_captions", path, prompts=("P",), join_lines=True)
    assert [r.turns[1].content for r in records] == ["a b", "c"]
    assert _kinds(tally, "changes") == [("joined_caption_lines", "x_0")]


def test_coco_captions_one_record_per_annotation(tmp_path: Path) -> None:
    data = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 215677, "file_name": "000000215677.jpg"},
            {"id": 9, "file_name": "000000000009.jpg"},
        ],
        "annotations": [
            {"image_id": 215677, "id": 401233, "caption": "A dog jumping."},
            {"image_id": 9, "id": 5, "caption": "Food on a plate\n"},
            {"image_id": 215677, "id": 403950, "caption": "A dog\nplays "},
            {"image_id": 215677, "id": 403951, "caption": "   "},
            {"image_id": 77, "id": 403952, "caption": "orphan"},
        ],
    }
    path = _write(tmp_path / "captions_train2017.json", data)
    records, tally = _run("coco_captions", path, prompts=("Describe the image briefly.",))
    assert [(r.id, r.images, r.turns[1].content) for r in records] == [
        ("401233", ("000000215677.jpg",), "A dog jumping."),
        ("5", ("000000000009.jpg",), "Food on a plate"),
        ("403950", ("000000215677.jpg",), "A dog\nplays"),
    ]
    assert all(r.turns[0] == Turn("user", "<image>\nDescribe the image briefly.") for r in records)
    assert _kinds(tally, "changes") == [("dropped_empty_caption", "403951")]
    assert _kinds(tally) == [("unknown_image_id", "403952")]


def test_sharegpt_cleaning_rules_are_logged(tmp_path: Path) -> None:
    lines = [
        {
            "id": "a_0",
            "system": "Be brief.",
            "conversations": [
                {"from": "gpt", "value": "Hi!"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "dangling"},
            ],
        },
        {"conversations": [{"from": "user", "value": "Q2"}, {"from": "assistant", "value": "A2"}]},
        {
            "id": "c_0",
            "conversations": [
                {"from": "human", "value": "what is <image> in html?"},
                {"from": "gpt", "value": "x"},
            ],
        },
        {
            "id": "d_0",
            "conversations": [
                {"from": "human", "value": "Q"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ],
        },
    ]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    records, tally = _run("sharegpt", path)
    assert records == [
        Record(
            "a_0",
            (),
            (Turn("system", "Be brief."), Turn("user", "Q"), Turn("assistant", "A")),
            str(path),
        ),
        Record("sharegpt_1", (), (Turn("user", "Q2"), Turn("assistant", "A2")), str(path)),
    ]
    assert _kinds(tally, "changes") == [
        ("dropped_leading_assistant_turn", "a_0"),
        ("dropped_trailing_user_turn", "a_0"),
        ("generated_id", "sharegpt_1"),
    ]
    assert _kinds(tally) == [("image_marker_in_text", "c_0"), ("not_alternating", "d_0")]


def test_file_level_fault_is_tallied_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1}', encoding="utf-8")
    records, tally = _run("llava", path)
    assert records == []
    assert [i.kind for i in tally.errors] == ["invalid_json"]
    assert str(path) in tally.errors[0].message


def test_a_broken_jsonl_line_is_tallied_and_the_records_after_it_are_kept(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    lines = [
        json.dumps({"id": "a", **good}),
        '{"id": "b", "conversations": [',
        json.dumps({"id": "c", **good}),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, tally = _run("llava", path)
    assert [r.id for r in records] == ["a", "c"]
    assert len(tally.errors) == 1 and "line 2" in tally.errors[0].message
