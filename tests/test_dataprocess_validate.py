"""The validator finds every planted fault, names the ids, and --drop-invalid keeps the rest."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dataprocess.__main__ import main
from dataprocess.schema import parse_record
from dataprocess.validate import check_image, text_problems


def _conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _images(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    Image.new("RGB", (8, 6), (1, 2, 3)).save(root / "ok" / "good.jpg")
    Image.new("P", (5, 5)).save(root / "ok" / "book.gif")
    (root / "ok" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


PLANTED = {
    "missing_image": {
        "id": "f_missing",
        "image": "ok/nowhere.jpg",
        "conversations": _conv("<image>\nQ", "A"),
    },
    "unreadable_image": {
        "id": "f_corrupt",
        "image": "ok/corrupt.jpg",
        "conversations": _conv("<image>\nQ", "A"),
    },
    "image_count_mismatch": {
        "id": "f_count",
        "image": "ok/good.jpg",
        "conversations": _conv("Q", "A"),
    },
    "empty_turn": {"id": "f_empty", "conversations": _conv("Q", "  ")},
    "not_alternating": {
        "id": "f_order",
        "conversations": [
            {"from": "gpt", "value": "A"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "B"},
        ],
    },
    "no_assistant_turn": {"id": "f_noanswer", "conversations": [{"from": "human", "value": "Q"}]},
    "unknown_role": {
        "id": "f_role",
        "conversations": [{"from": "bot", "value": "Q"}, {"from": "gpt", "value": "A"}],
    },
    "image_marker_in_answer": {
        "id": "f_answer",
        "image": "ok/good.jpg",
        "conversations": _conv("<image>", "see <image>"),
    },
    "box_out_of_range": {
        "id": "f_box",
        "conversations": _conv("Box it", "<ref>x</ref><box>(10,20),(1000,30)</box>"),
    },
    "special_token": {"id": "f_token", "conversations": _conv("Q <|extra_0|>", "A")},
    "duplicate_id": {"id": "g_good", "conversations": _conv("again", "A")},
}
GOOD = [
    {"id": "g_good", "image": "ok/good.jpg", "conversations": _conv("<image>\nQ", "A")},
    {
        "id": "g_book",
        "image": "ok/book.jpg",
        "conversations": _conv("<image>\nWho wrote it?", "Me"),
    },
    {"id": 7, "conversations": _conv("text only", "fine")},
]


def _fixture(tmp_path: Path) -> Path:
    _images(tmp_path / "img")
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(GOOD + list(PLANTED.values())), encoding="utf-8")
    return data


def test_validate_finds_every_planted_fault(tmp_path: Path, capsys) -> None:
    data = _fixture(tmp_path)
    status = main(["validate", "--data", str(data), "--image_folder", str(tmp_path / "img")])
    assert status == 1
    report = json.loads((tmp_path / "chat.report.json").read_text(encoding="utf-8"))
    errors = report["sources"]["chat.json"]["errors"]
    found = {kind: entry["examples"] for kind, entry in errors.items()}
    assert found == {kind: [raw["id"]] for kind, raw in PLANTED.items()}
    changes = report["sources"]["chat.json"]["changes"]
    assert changes == {"image_extension_fixed": {"count": 1, "examples": ["g_book"]}}
    out = capsys.readouterr().out
    assert "ERRORS REMAIN" in out and "f_box" in out


def test_drop_invalid_writes_good_records_and_dropped_list(tmp_path: Path) -> None:
    data = _fixture(tmp_path)
    good_path = tmp_path / "good.jsonl"
    args = ["validate", "--data", str(data), "--image_folder", str(tmp_path / "img")]
    assert main([*args, "--drop-invalid", "--output", str(good_path)]) == 0
    lines = [json.loads(line) for line in good_path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == ["g_good", "g_book", "7"]
    assert lines[1]["image"] == "ok/book.gif"  # the real file, found by stem
    dropped = [
        json.loads(line) for line in (tmp_path / "good.dropped.jsonl").read_text().splitlines()
    ]
    assert {d["id"] for d in dropped} == {raw["id"] for raw in PLANTED.values()}
    assert all(d["file"] == str(data) for d in dropped)


def test_unparsable_json_list_is_a_hard_error_naming_file_and_position(tmp_path, capsys) -> None:
    bad_utf8 = tmp_path / "latin1.json"
    bad_utf8.write_bytes('[{"id": "é"}]'.encode("latin-1"))
    cut = tmp_path / "cut.json"
    cut.write_text('[{"id": "1", "conversations": []},\n {"id": ', encoding="utf-8")
    for path, where in ((bad_utf8, "invalid UTF-8 at byte 9"), (cut, "line 2, column")):
        args = [
            "validate",
            "--data",
            str(path),
            "--drop_invalid",
            "--output",
            str(tmp_path / "o.json"),
        ]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(path) in err and where in err
        assert not (tmp_path / "o.json").exists()  # nothing half-read is written


def test_broken_jsonl_line_is_one_invalid_record(tmp_path: Path, capsys) -> None:
    good = {"id": "1", "conversations": _conv("Q", "A")}
    after = {"id": "3", "conversations": _conv("Q", "A")}
    data = tmp_path / "cut.jsonl"
    data.write_text(json.dumps(good) + '\n{"id": \n' + json.dumps(after) + "\n", encoding="utf-8")
    assert main(["validate", "--data", str(data)]) == 1
    report = json.loads(data.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert report["sources"]["cut.jsonl"]["errors"]["invalid_json"]["examples"] == ["index 1"]
    assert "index 1" in capsys.readouterr().out


def test_drop_invalid_needs_output(tmp_path: Path, capsys) -> None:
    data = _fixture(tmp_path)
    assert main(["validate", "--data", str(data), "--drop-invalid"]) == 2
    assert "--output" in capsys.readouterr().err


def test_box_rules() -> None:
    def problems(answer: str) -> list[str]:
        record = parse_record({"id": "b", "conversations": _conv("Q", answer)})
        return [kind for kind, _ in text_problems(record)]

    assert problems("<ref>a</ref><box>(0,0),(999,999)</box>") == []
    assert problems("<box>(5,5),(5,9)</box>") == ["box_out_of_range"]  # x1 == x2
    assert problems("<box>(5,9),(7,3)</box>") == ["box_out_of_range"]  # y1 > y2
    assert problems("<box>(-1,0),(7,3)</box>") == ["box_out_of_range"]
    assert problems("<box>[0.1, 0.2, 0.3, 0.4]</box>") == ["bad_box"]


def test_check_image_statuses(tmp_path: Path) -> None:
    _images(tmp_path)
    assert check_image(tmp_path, "ok/good.jpg").status == "ok"
    fixed = check_image(tmp_path, "ok/book.jpg")
    assert (fixed.status, fixed.path) == ("fixed", "ok/book.gif")
    assert check_image(tmp_path, "ok/corrupt.jpg").status == "unreadable"
    missing = check_image(tmp_path, "ok/none.jpg")
    assert missing.status == "missing" and "none.jpg" in missing.message
