"""Preference records (DPO): the schema, the one validator, the loader, the build's spool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dataprocess.report import Tally
from dataprocess.schema import Record, RecordError, Turn, parse_record, record_to_json
from dataprocess.spool import RecordSpool
from dataprocess.validate import RecordValidator
from dataset.loading import load_records


def _pair(record_id: str = "p1", **extra: object) -> dict:
    record = {
        "id": record_id,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is there a circle?"},
        ],
        "chosen": "No.",
        "rejected": "Yes.",
    }
    return {**record, **extra}


def test_a_preference_record_parses_with_its_history_and_round_trips() -> None:
    record = parse_record(_pair())
    assert record.is_preference
    assert record.turns[-1] == Turn("user", "Is there a circle?")
    assert [t.role for t in record.turns] == ["user", "assistant", "user"]
    assert (record.chosen, record.rejected) == ("No.", "Yes.")
    assert parse_record(record_to_json(record)) == record
    assert not parse_record(
        {"id": 1, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    ).is_preference


@pytest.mark.parametrize(
    ("change", "kind", "words"),
    [
        ({"rejected": "No."}, "identical_answers", "same answer"),
        ({"rejected": " No. "}, "identical_answers", "same answer"),
        ({"chosen": "  "}, "empty_answer", "'chosen' is empty"),
        ({"rejected": ""}, "empty_answer", "'rejected' is empty"),
        ({"chosen": 3}, "bad_type", "'chosen' is int"),
        ({"chosen": "<image> no"}, "image_marker_in_answer", "'chosen' contains"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "<image>\nQ"},
                    {"from": "gpt", "value": "A"},
                ]
            },
            "trailing_assistant_turn",
            "ends with an assistant turn",
        ),
    ],
)
def test_bad_pairs_are_named(change: dict, kind: str, words: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(_pair("bad", **change), source="pairs.json")
    assert caught.value.kind == kind
    assert words in str(caught.value) and "'bad'" in str(caught.value)
    assert "pairs.json" in str(caught.value)


def test_one_answer_without_the_other_is_missing_field() -> None:
    raw = _pair()
    del raw["rejected"]
    with pytest.raises(RecordError, match="no 'rejected'") as caught:
        parse_record(raw)
    assert caught.value.kind == "missing_field"


def test_validator_checks_answers_and_the_kind_asked_for() -> None:
    sft = parse_record(
        {
            "id": "s",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        }
    )
    pair = parse_record(_pair("p"), source="f.json")
    token = parse_record(_pair("t", chosen="no <|im_end|>"), source="f.json")

    def kinds(preference: bool | None, records: list[Record]) -> tuple[list[str], list[str]]:
        tally = Tally("t")
        validator = RecordValidator(None, preference=preference)
        good = [r.id for r in validator.validate(records, lambda _r: tally)]
        return good, [issue.kind for issue in tally.errors]

    assert kinds(None, [sft, pair]) == (["s", "p"], [])
    assert kinds(True, [sft, pair]) == (["p"], ["not_a_preference_record"])
    assert kinds(False, [sft, pair]) == (["s"], ["preference_record"])
    assert kinds(True, [token]) == ([], ["special_token"])


def test_spool_keeps_the_answers(tmp_path: Path) -> None:
    record = parse_record(_pair(), source="x.json")
    with RecordSpool(tmp_path) as spool:
        [offset] = spool.extend([record])
        assert spool.read(offset) == record


def test_load_records_skips_and_counts_bad_pairs(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    data = [_pair("good"), _pair("same", rejected="No."), _pair("empty", chosen="")]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="identical_answers") as caught:
        load_records(path, image_folder=tmp_path, cache_dir=cache, preference=True)
    assert "'same'" in str(caught.value) and "empty_answer" in str(caught.value)
    records, tally = load_records(
        path, image_folder=tmp_path, cache_dir=cache, preference=True, skip_invalid=True
    )
    assert records["id"] == ["good"]
    assert records["chosen"] == ["No."] and records["rejected"] == ["Yes."]
    assert tally.counts["read"] == 3 and tally.num_invalid == 2
    with pytest.raises(ValueError, match="preference_record"):
        load_records(path, image_folder=tmp_path, cache_dir=cache, skip_invalid=True)


def test_stats_measure_a_pair_by_its_longer_row(tokenizer) -> None:
    from dataprocess.stats import record_length

    pair = parse_record(_pair(chosen="No.", rejected="Yes, there is a small red circle."))
    sft = {key: value for key, value in _pair().items() if key not in ("chosen", "rejected")}
    longer = {"from": "gpt", "value": "Yes, there is a small red circle."}
    as_sft = parse_record({**sft, "conversations": [*sft["conversations"], longer]})
    length = record_length(pair, tokenizer, 4, system="s")
    assert length == record_length(as_sft, tokenizer, 4, system="s")
