"""The build's spool: records come back exactly, and a build that fails leaves nothing behind."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

import dataprocess.build as build_module
from dataprocess.build import build
from dataprocess.config import load_config
from dataprocess.schema import Record, Turn
from dataprocess.spool import RecordSpool
from dataprocess.validate import RecordValidator

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "dataprocess" / "config.yaml"


def test_records_come_back_exactly(tmp_path: Path) -> None:
    records = [
        Record("1", (), (Turn("user", "q"), Turn("assistant", "a")), "a.json"),
        Record(
            'ü "2"\n',
            ("x/1.jpg", "y/2.png"),
            (Turn("system", "s\n"), Turn("user", "<image>\n<image>\n图"), Turn("assistant", "\\")),
            "/data/b.jsonl",
        ),
    ]
    with RecordSpool(tmp_path) as spool:
        first = spool.extend(records)
        second = spool.extend(records[:1])
        assert list(first) == [0, first[1]] and second[0] == spool.size - (first[1] - first[0])
        assert [spool.read(o) for o in reversed(first)] == records[::-1]
        assert [spool.read_id(o) for o in (*first, *second)] == ["1", 'ü "2"\n', "1"]
        assert os.listdir(tmp_path) == []  # an anonymous file: never visible, never left behind


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failing_build_keeps_the_old_output(tmp_path: Path) -> None:
    output = tmp_path / "chat.json"
    output.write_text("[]\n", encoding="utf-8")
    config = load_config(EXAMPLE_CONFIG)
    bad = replace(config.sources[0], image_prefix="no/such/folder")  # every image is missing
    config = replace(config, sources=(bad, *config.sources[1:]))
    report = build(config, output=output, workers=2)
    assert not report["ok"] and report["written"] == 0 and report["dropped"] == 2
    assert output.read_text(encoding="utf-8") == "[]\n"
    assert _listing(tmp_path) == ["chat.dropped.jsonl", "chat.json", "chat.report.json"]


def test_an_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    spools: list[RecordSpool] = []

    class Tracked(RecordSpool):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            spools.append(self)

    checked = 0
    original = RecordValidator._check

    def check_then_stop(self: RecordValidator, record: Record, tally: object) -> Record | None:
        nonlocal checked
        checked += 1
        if checked == 5:
            raise KeyboardInterrupt  # Ctrl-C halfway through validating and writing
        return original(self, record, tally)

    monkeypatch.setattr(build_module, "RecordSpool", Tracked)
    monkeypatch.setattr(RecordValidator, "_check", check_then_stop)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build(load_config(EXAMPLE_CONFIG), output=out / "chat.json", workers=2)
    assert _listing(out) == []  # no chat.json, no chat.json.tmp, no report, no spool
    assert len(spools) == 1 and spools[0]._file.closed


def test_report_counts_match_the_output(tmp_path: Path) -> None:
    output = tmp_path / "chat.jsonl"
    report = build(load_config(EXAMPLE_CONFIG), output=output, workers=2)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert report["written"] == len(lines) == 16
    assert len({json.loads(line)["id"] for line in lines}) == 16
