"""Record validation before training, skip_invalid, and the memory-mapped records cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dataprocess.report import MAX_EXAMPLES
from dataprocess.schema import RecordError
from dataset import loading
from dataset.loading import load_records


def _good(record_id: str, image: str | None = "ok.png") -> dict:
    record: dict = {"id": record_id, "conversations": []}
    question = "<image>\nWhat is it?" if image else "What is it?"
    if image:
        record["image"] = image
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": "A dot."},
    ]
    return record


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


BAD_RECORDS = {
    "unknown_role": {"id": "b1", "conversations": _turns(("robot", "hi"), ("gpt", "x"))},
    "empty_turn": {"id": "b2", "conversations": _turns(("human", "  "), ("gpt", "x"))},
    "not_alternating": {
        "id": "b3",
        "conversations": _turns(("human", "a"), ("gpt", "b"), ("gpt", "c")),
    },
    "no_assistant_turn": {"id": "b4", "conversations": []},
    "image_count_mismatch": {
        "id": "b5",
        "image": ["ok.png", "ok.png"],
        "conversations": _turns(("human", "<image> one"), ("gpt", "x")),
    },
    "image_marker_in_answer": {
        "id": "b6",
        "image": "ok.png",
        "conversations": _turns(("human", "<image>"), ("gpt", "see <image>")),
    },
    "duplicate_id": _good("good-0"),
    "missing_image": _good("b8", image="missing.png"),
}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    return tmp_path


def _write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_every_bad_kind_raises_naming_id_and_file(folder: Path, kind: str):
    bad = BAD_RECORDS[kind]
    path = _write(folder / "data.json", [_good("good-0"), bad, _good("good-2", image=None)])
    with pytest.raises(ValueError) as info:
        load_records(path, image_folder=folder, cache_dir=folder / "cache")
    message = str(info.value)
    assert f"{kind}: 1" in message
    assert repr(bad["id"]) in message
    assert str(path) in message
    assert "1 of 3 records" in message


def test_broken_image_file_is_reported(folder: Path):
    path = _write(folder / "data.json", [_good("x", image="broken.png")])
    with pytest.raises(ValueError, match="broken.png does not decode"):
        load_records(path, image_folder=folder, cache_dir=folder / "cache")
    # Without an image folder (or with check_images=False) images are not opened.
    records, _ = load_records(path, cache_dir=folder / "cache")
    assert records["id"] == ["x"]
    records, _ = load_records(
        path, image_folder=folder, check_images=False, cache_dir=folder / "cache"
    )
    assert len(records) == 1


def test_skip_invalid_skips_and_counts(folder: Path, caplog: pytest.LogCaptureFixture):
    good = [_good(f"good-{i}", image="ok.png" if i % 2 else None) for i in range(4)]
    path = _write(folder / "data.jsonl", good + list(BAD_RECORDS.values()))
    with caplog.at_level("WARNING"):
        records, summary = load_records(
            path, image_folder=folder, skip_invalid=True, cache_dir=folder / "cache"
        )
    assert records["id"] == [f"good-{i}" for i in range(4)]
    assert summary.counts["read"] == 4 + len(BAD_RECORDS)
    assert summary.counts["valid"] == 4 and summary.num_invalid == len(BAD_RECORDS)
    assert summary.problem_counts() == dict.fromkeys(BAD_RECORDS, 1)
    assert "skipping invalid records" in caplog.text
    row = records[1]
    assert row["images"] == ["ok.png"]
    assert row["roles"] == ["user", "assistant"]
    assert row["contents"] == ["<image>\nWhat is it?", "A dot."]


def test_examples_are_capped(folder: Path):
    bad = [{"id": f"e{i}", "conversations": []} for i in range(25)]
    path = _write(folder / "data.json", [_good("a", image=None), *bad])
    _, summary = load_records(path, skip_invalid=True, cache_dir=folder / "cache")
    assert summary.problem_counts() == {"no_assistant_turn": 25}
    lines = summary.describe().splitlines()
    assert len(lines) == 1 + MAX_EXAMPLES + 1  # headline, examples, "... and 15 more"
    assert lines[-1].endswith("and 15 more") and "'e0'" in lines[1]


def test_file_level_faults_name_the_file(folder: Path):
    path = folder / "bad.json"
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(RecordError, match="bad.json"):
        load_records(path, cache_dir=folder / "cache")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_records(folder / "nowhere.json", cache_dir=folder / "cache")
    assert not list((folder / "cache").rglob("*.arrow"))  # nothing half-written is kept


def test_cache_is_memory_mapped_and_reused(folder: Path, monkeypatch: pytest.MonkeyPatch):
    cache = folder / "cache"
    path = _write(folder / "data.json", [_good(f"r{i}") for i in range(30)])
    first, _ = load_records(path, image_folder=folder, cache_dir=cache)
    assert first.cache_files and Path(first.cache_files[0]["filename"]).parent.parent == cache

    def fail(*args, **kwargs):
        raise AssertionError("records were parsed again instead of read from the cache")

    monkeypatch.setattr(loading, "_validate_and_write", fail)
    second, summary = load_records(path, image_folder=folder, cache_dir=cache)
    assert second.cache_files == first.cache_files
    assert second["id"] == first["id"] and summary.counts["valid"] == 30

    # A changed file (new size / mtime) is a different cache entry.
    monkeypatch.undo()
    _write(path, [_good("only")])
    os.utime(path, ns=(1, 1))
    third, _ = load_records(path, image_folder=folder, cache_dir=cache)
    assert third["id"] == ["only"]


def test_cached_invalid_records_still_raise(folder: Path):
    path = _write(folder / "data.json", [_good("a"), BAD_RECORDS["empty_turn"]])
    load_records(path, skip_invalid=True, cache_dir=folder / "cache")
    with pytest.raises(ValueError, match="'b2'"):
        load_records(path, cache_dir=folder / "cache")
