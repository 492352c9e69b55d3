"""Record files a hostile user can write: nesting deep enough to exhaust the stack or memory is
refused with the record named, in bounded memory; a UTF-8 BOM is accepted in JSON lines too."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from dataprocess.nesting import NestingScanner
from dataprocess.reading import MAX_DEPTH, iter_raw_records
from dataprocess.schema import RecordError

ROOT = Path(__file__).resolve().parents[1]


def _record(record_id: str, meta: str = "0") -> str:
    turns = '[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "[[[{{ x"}]'
    return f'{{"id": "{record_id}", "conversations": {turns}, "meta": {meta}}}'


def _nested(depth: int) -> str:
    """A value that makes a record `depth` levels deep (the record itself is level 1)."""
    return "[" * (depth - 1) + "]" * (depth - 1)


def _write(path: Path, lines: list[str]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text("[" + ",\n".join(lines) + "]", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_the_depth_limit_itself_is_read(tmp_path, suffix):
    path = _write(tmp_path / f"ok{suffix}", [_record("a", _nested(MAX_DEPTH))])
    assert [raw["id"] for _, raw in iter_raw_records(path)] == ["a"]


def test_a_jsonl_record_too_deep_is_named_by_line_and_skippable(tmp_path):
    lines = [_record("a"), _record("deep", _nested(MAX_DEPTH + 1)), _record("c")]
    path = _write(tmp_path / "deep.jsonl", lines)
    with pytest.raises(RecordError, match=r"deep.jsonl, index 1: line 2: nested deeper than 100"):
        list(iter_raw_records(path))
    errors: list[RecordError] = []
    good = [raw["id"] for _, raw in iter_raw_records(path, on_error=errors.append)]
    assert good == ["a", "c"] and [e.kind for e in errors] == ["too_deep"]


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    text = json.dumps("[" * 500 + '\\"{' * 300)  # escaped quotes must not end the string early
    path = _write(tmp_path / "strings.jsonl", [_record("a", text)])
    assert [raw["meta"] for _, raw in iter_raw_records(path)] == [json.loads(text)]


def test_a_json_list_record_too_deep_refuses_the_file_naming_the_record(tmp_path):
    lines = [_record("a"), _record("b"), _record("deep", _nested(5000))]
    path = _write(tmp_path / "deep.json", lines)
    with pytest.raises(RecordError, match=r"deep.json, index 2: nested deeper") as caught:
        list(iter_raw_records(path))
    assert caught.value.kind == "too_deep"


def _limit_memory() -> None:
    one_gib = 1 << 30
    resource.setrlimit(resource.RLIMIT_AS, (one_gib, one_gib))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_validate_refuses_100000_levels_in_bounded_memory_and_time(tmp_path, suffix):
    # The reported case: 200 KB nested 100,000 deep took 23 GB (JSON) or a RecursionError (JSONL).
    path = _write(tmp_path / f"deep{suffix}", [_record("a"), _record("deep", _nested(100_000))])
    done = subprocess.run(
        [sys.executable, "-m", "dataprocess", "validate", "--data", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output and "too_deep" in output


def test_a_bom_is_accepted_in_json_lines_as_in_a_json_list(tmp_path):
    for suffix in (".json", ".jsonl"):
        path = _write(tmp_path / f"bom{suffix}", [_record("a"), _record("b")])
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert [raw["id"] for _, raw in iter_raw_records(path)] == ["a", "b"]


def _random_value(rng: random.Random, depth: int):
    """Values whose strings hold quotes, backslashes and brackets, to mislead a bracket count."""
    pick = rng.random()
    if depth > 10 or pick < 0.3:
        return rng.choice(['a"b', "x\\", "[[{", '\\"]', "", '\\\\"[', "\\\\\\", '\n"[\\', 1, None])
    if pick < 0.65:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["k", "[", '"q', "\\", '\\"']
    return {
        f"{rng.choice(keys)}{i}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 3))
    }


def _depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list):
        return 1 + max((_depth(child) for child in children), default=0)
    return 0


def test_the_scanner_agrees_with_a_parser_over_any_piece_boundaries():
    rng = random.Random(0)
    for _ in range(2000):
        items = [_random_value(rng, 0) for _ in range(rng.randint(1, 4))]
        text = json.dumps(items, indent=rng.choice([None, 1])).encode()
        limit = rng.randint(1, 8)
        expected = next((k for k, item in enumerate(items) if 1 + _depth(item) > limit), None)
        scanner, found, position = NestingScanner(limit), None, 0
        while position < len(text) and found is None:
            size = rng.randint(1, 9)
            found = scanner.feed(text[position : position + size])
            position += size
        assert found == expected, (text, limit)


def test_training_data_too_deep_is_one_named_invalid_record(tmp_path):
    from dataset.loading import load_records

    lines = [_record("a"), _record("deep", _nested(100_000))]
    path = _write(tmp_path / "deep.jsonl", lines)
    with pytest.raises(ValueError, match=r"too_deep.*line 2: nested deeper than 100 levels"):
        load_records(path, cache_dir=tmp_path / "cache")
    dataset, tally = load_records(path, skip_invalid=True, cache_dir=tmp_path / "cache2")
    assert len(dataset) == 1 and tally.num_invalid == 1
