"""build's output is pinned byte for byte: a change of algorithm (streaming through a spool file
instead of lists) must not change what a config writes.

The hashes were taken from the list-based build (before the spool) on the same inputs. The
config mixes what can change order or content: random and first-N sampling, duplicate ids inside
a source, two sources whose names prefix each other, conversion errors, invalid records, a fixed
image extension, and the seeded shuffle, written as JSON and as JSONL.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from dataprocess.build import build
from dataprocess.config import load_config

EXPECTED = {
    "chat.json": "606f6a3bdca59c52",
    "chat.jsonl": "c60706027621dbf6",
    "chat.dropped.jsonl": "3a793450351cd91e",
    "sources": "8dfb0c03ceada1e6",
}


def _record(i: int, rng_image: int | None, extra: str = "") -> dict:
    question = f"question {i} " + "word " * (i % 7) + extra
    record: dict = {"id": str(i // 3 if i % 5 == 0 else i)}  # every 5th id repeats an earlier one
    if rng_image is not None:
        record["image"] = f"{rng_image}.jpg"
        question = "<image>\n" + question
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": f"answer {i}"},
    ]
    return record


def _write_inputs(folder: Path) -> Path:
    images = folder / "images" / "p"
    images.mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (4, 4), (k * 40, 0, 0)).save(images / f"{k}.jpg")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(images / "4.png")  # listed as .jpg: gets fixed
    a = [_record(i, i % 7 if i % 7 < 6 else None) for i in range(40)]  # 5.jpg is missing
    a[11]["conversations"][0]["value"] += " <box>(1,2),(3,4000)</box>"  # box out of range
    a[17] = {"id": "broken", "conversations": []}  # a conversion error
    b = [_record(i, None, extra="b") for i in range(12)]
    (folder / "a.json").write_text(json.dumps(a, ensure_ascii=False), encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b), encoding="utf-8")
    (folder / "c.json").write_text(json.dumps(b[:5]), encoding="utf-8")
    config = folder / "config.yaml"
    config.write_text(
        "image_root: images\noutput: out/chat.json\nseed: 7\nshuffle: true\n"
        "sources:\n"
        "  - {name: a, format: llava, path: a.json, image_prefix: p,"
        " sample: {mode: random, n: 25, seed: 4}}\n"
        "  - {name: a_b, format: llava, path: b.jsonl, sample: {mode: first, n: 9}}\n"
        "  - {name: c, format: llava, path: c.json}\n",
        encoding="utf-8",
    )
    return config


def _digest(data: bytes, folder: Path) -> str:
    return hashlib.sha256(data.replace(str(folder).encode(), b"TMP")).hexdigest()[:16]


@pytest.mark.parametrize("name", ["chat.json", "chat.jsonl"])
def test_build_output_is_pinned(tmp_path: Path, name: str) -> None:
    config = load_config(_write_inputs(tmp_path))
    output = tmp_path / "out" / name
    report = build(config, output=output, drop_invalid=True, workers=2)
    assert (report["written"], report["dropped"], report["errors"]) == (34, 6, 6)
    sources = json.dumps(report["sources"], sort_keys=True, ensure_ascii=False).encode()
    dropped = (tmp_path / "out" / "chat.dropped.jsonl").read_bytes()
    got = {
        name: _digest(output.read_bytes(), tmp_path),
        "chat.dropped.jsonl": _digest(dropped, tmp_path),
        "sources": _digest(sources, tmp_path),
    }
    assert got == {key: EXPECTED[key] for key in got}


def test_example_config_output_is_pinned(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "dataprocess" / "config.yaml")
    build(config, output=tmp_path / "chat.json", workers=2)
    assert _digest((tmp_path / "chat.json").read_bytes(), tmp_path) == "97ffbcd04f3b44f1"
