"""Tests for dataprocess.schema and dataprocess.reading: parsing, every fault kind, file reading
and the round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dataprocess.reading import iter_raw_records
from dataprocess.schema import (
    IMAGE_MARKER,
    Record,
    RecordError,
    Turn,
    parse_record,
    record_to_json,
)


def _conv(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


def _good(**extra: object) -> dict:
    raw = {
        "id": "000000318219",
        "image": "coco/train2017/000000318219.jpg",
        "conversations": _conv(("human", "Describe.\n<image>"), ("gpt", "A kitchen.")),
    }
    raw.update(extra)
    return raw


def test_parse_single_image_record() -> None:
    record = parse_record(_good(), source="a.json", index=3)
    assert record == Record(
        id="000000318219",
        images=("coco/train2017/000000318219.jpg",),
        turns=(Turn("user", "Describe.\n<image>"), Turn("assistant", "A kitchen.")),
        source="a.json",
    )


def test_int_id_becomes_str_and_text_only_has_no_images() -> None:
    raw = {"id": 2367401, "model": "", "conversations": _conv(("human", "Hi"), ("gpt", "Hello"))}
    record = parse_record(raw)
    assert record.id == "2367401"
    assert record.images == ()


def test_multi_image_and_aliases_user_assistant() -> None:
    raw = {
        "id": "x",
        "image": ["a.jpg", "b.jpg"],
        "conversations": _conv(("user", "<image>\n<image>\nDiffer?"), ("assistant", "Yes")),
    }
    record = parse_record(raw)
    assert record.images == ("a.jpg", "b.jpg")
    assert [t.role for t in record.turns] == ["user", "assistant"]


def test_top_level_system_and_leading_system_turn() -> None:
    top = parse_record(
        {"id": "s", "system": "Be brief.", "conversations": _conv(("human", "Q"), ("gpt", "A"))}
    )
    lead = parse_record(
        {"id": "s", "conversations": _conv(("system", "Be brief."), ("human", "Q"), ("gpt", "A"))}
    )
    assert top.turns == lead.turns
    assert top.turns[0] == Turn("system", "Be brief.")


@pytest.mark.parametrize(
    ("raw", "kind", "words"),
    [
        ({"conversations": _conv(("human", "Q"), ("gpt", "A"))}, "missing_field", "'id'"),
        ({"id": "r1"}, "missing_field", "conversations"),
        ({"id": "r1", "conversations": "no"}, "bad_type", "list"),
        ({"id": "r1", "conversations": []}, "no_assistant_turn", "empty"),
        ({"id": True, "conversations": []}, "bad_type", "'id'"),
        ({"id": "r1", "image": [], "conversations": []}, "bad_type", "image"),
        ({"id": "r1", "conversations": _conv(("bot", "Q"), ("gpt", "A"))}, "unknown_role", "gpt"),
        ({"id": "r1", "conversations": _conv(("human", "Q"), ("gpt", "  \n"))}, "empty_turn", "1"),
        ({"id": "r1", "conversations": [{"from": "human"}]}, "missing_field", "'value'"),
        ({"id": "r1", "conversations": [{"from": "human", "value": 3}]}, "bad_type", "int"),
        ({"id": "r1", "conversations": _conv(("gpt", "A"), ("human", "Q"))}, "not_alternating", ""),
        (
            {"id": "r1", "conversations": _conv(("human", "Q"), ("human", "Q2"), ("gpt", "A"))},
            "not_alternating",
            "expected assistant",
        ),
        ({"id": "r1", "conversations": _conv(("human", "Q"))}, "no_assistant_turn", ""),
        (
            {"id": "r1", "conversations": _conv(("human", "Q"), ("gpt", "A"), ("human", "Q2"))},
            "trailing_user_turn",
            "",
        ),
        (
            {"id": "r1", "conversations": _conv(("human", "Q"), ("system", "S"), ("gpt", "A"))},
            "not_alternating",
            "system",
        ),
        (
            {"id": "r1", "image": "a.jpg", "conversations": _conv(("human", "Q"), ("gpt", "A"))},
            "image_count_mismatch",
            "0 <image>",
        ),
        (
            {"id": "r1", "conversations": _conv(("human", "<image> Q"), ("gpt", "A"))},
            "image_count_mismatch",
            "0 image(s)",
        ),
        (
            {
                "id": "r1",
                "image": "a.jpg",
                "conversations": _conv(("human", "<image> Q"), ("gpt", "see <image>")),
            },
            "image_marker_in_answer",
            "assistant",
        ),
    ],
)
def test_every_schema_fault_raises_with_kind_and_names(raw: dict, kind: str, words: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(raw, source="data/chat.json", index=7)
    error = info.value
    assert error.kind == kind
    message = str(error)
    assert "data/chat.json" in message
    assert "index 7" in message
    assert words in message
    if isinstance(raw.get("id"), str):
        assert "'r1'" in message


def test_record_to_json_round_trips() -> None:
    raws = [
        _good(),
        {
            "id": "m",
            "image": ["a.jpg", "b.png"],
            "conversations": _conv(("human", "<image><image>\nQ"), ("gpt", "A\n\nB")),
        },
        {"id": "t", "conversations": _conv(("system", "Sys"), ("human", "Q"), ("gpt", "A"))},
    ]
    for raw in raws:
        record = parse_record(raw)
        out = record_to_json(record)
        assert parse_record(out) == record
    assert record_to_json(parse_record(raws[0])) == raws[0]
    assert "image" not in record_to_json(parse_record(raws[2]))
    assert record_to_json(parse_record(raws[2]))["conversations"][0]["from"] == "system"
    assert IMAGE_MARKER == "<image>"


def test_iter_raw_records_json_and_jsonl(tmp_path: Path) -> None:
    records = [_good(), _good(id="2")]
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps(records), encoding="utf-8")
    assert list(iter_raw_records(json_path)) == [(0, records[0]), (1, records[1])]
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert list(iter_raw_records(jsonl_path)) == [(0, records[0]), (1, records[1])]


@pytest.mark.parametrize(
    ("name", "content", "kind", "words"),
    [
        ("bad.json", b'[{"id": "1"}', "invalid_json", "invalid JSON"),
        ("bad.json", b'{"id": "1"}', "not_a_list", "dict"),
        ("bad.json", b'[{"id": "1"}, 5]', "bad_type", "index 1"),
        ("bad.json", b"  \n", "empty_file", "empty"),
        ("bad.json", b'[{"id": "\xff"}]', "invalid_utf8", "UTF-8"),
        ("bad.jsonl", b'{"id": "1"}\n{"id": \n', "invalid_json", "line 2"),
        ("bad.jsonl", b'{"id": "1"}\n[1]\n', "bad_type", "line 2"),
        ("bad.jsonl", b'{"id": "1"}\n{"id": "\xc3"}\n', "invalid_utf8", "line 2"),
    ],
)
def test_iter_raw_records_file_faults(
    tmp_path: Path, name: str, content: bytes, kind: str, words: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordError) as info:
        list(iter_raw_records(path))
    assert info.value.kind == kind
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_json_list_is_streamed_with_python_numbers(tmp_path: Path, monkeypatch) -> None:
    # Neither format is read whole: iter_raw_records never calls read_bytes / read_text.
    for name in ("read_bytes", "read_text"):
        monkeypatch.setattr(Path, name, lambda *_a, **_k: pytest.fail("file read whole"))
    records = [_good(id=str(i), score=i + 0.5, count=i) for i in range(3000)]  # > one chunk
    json_path = tmp_path / "a.json"
    with json_path.open("w", encoding="utf-8") as out:
        out.write("\ufeff" + json.dumps(records, ensure_ascii=False))
    got = list(iter_raw_records(json_path))
    assert got == list(enumerate(records))
    assert type(got[5][1]["score"]) is float and type(got[5][1]["count"]) is int
    jsonl_path = tmp_path / "a.jsonl"
    with jsonl_path.open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    assert list(iter_raw_records(jsonl_path)) == list(enumerate(records))


def test_json_list_fault_far_into_the_file_names_line_column_and_byte(tmp_path: Path) -> None:
    good = json.dumps(_good())
    lines = ["["] + [good + ","] * 2000 + ['{"id": "b",,}', "]"]  # the fault is past 64 KiB
    path = tmp_path / "big.json"
    path.write_text("\n".join(lines), encoding="utf-8")
    offset = path.read_bytes().index(b",,") + 1
    seen = []
    with pytest.raises(RecordError, match=f"line 2002, column 12, byte {offset}") as info:
        for index, _raw in iter_raw_records(path):
            seen.append(index)
    assert info.value.kind == "invalid_json" and str(path) in str(info.value)
    assert seen == []  # a broken JSON list is refused before any of its records is used
    text = "[" + ",".join([good] * 2000) + ',{"id": "caf\xe9"}]'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RecordError, match=f"invalid UTF-8 at byte {text.index(chr(0xE9))}"):
        list(iter_raw_records(path))


@pytest.mark.parametrize(
    ("content", "words"),
    [(b'"text"', "top level is str"), (b"1.5", "top level is float"), (b"[1] [2]", "garbage")],
)
def test_json_list_top_level_faults(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "top.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=words):
        list(iter_raw_records(path))


def test_missing_file_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot read"):
        list(iter_raw_records(tmp_path / "nope.json"))


def test_import_does_not_pull_torch() -> None:
    code = (
        "import dataprocess, dataprocess.schema, dataprocess.reading, sys; "
        "assert 'torch' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
