"""Each preference converter reads a small fixture in its public layout into preference records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataprocess.config import ConfigError, SourceConfig, load_config
from dataprocess.report import Tally
from dataprocess.schema import Record, Turn
from dataprocess.sources import converter_for


def _run(fmt: str, path: Path) -> tuple[list[Record], Tally]:
    source = SourceConfig(name="src", format=fmt, paths=(path,))
    tally = Tally("src")
    return list(converter_for(fmt)(source, tally)), tally


def _write(path: Path, rows: list[dict], jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _errors(tally: Tally) -> list[tuple[str, str | None]]:
    return [(issue.kind, issue.record_id) for issue in tally.errors]


def test_rlaif_v_rows_path_or_parquet_image_dict(tmp_path: Path) -> None:
    row = {
        "ds_name": "RLAIF-V",
        "question": "Describe the image.",
        "chosen": "A dog on grass.",
        "rejected": "A dog and a cat on grass.",
        "origin_dataset": "COCO",
        "origin_split": '{"model": "OmniLMM-12B"}',
    }
    rows = [
        {**row, "idx": "1", "image": "coco/1.jpg", "image_path": "ignored.jpg"},
        {**row, "idx": "2", "image": {"path": None, "bytes": "..."}, "image_path": "coco/2.jpg"},
        {**row, "idx": "3", "image": "coco/3.jpg", "rejected": "A dog on grass."},
        {**row, "image": "coco/4.jpg"},
    ]
    path = _write(tmp_path / "rlaif.jsonl", rows, jsonl=True)
    records, tally = _run("rlaif_v", path)
    prompt = (Turn("user", "<image>\nDescribe the image."),)
    assert records == [
        Record("1", ("coco/1.jpg",), prompt, str(path), row["chosen"], row["rejected"]),
        Record("2", ("coco/2.jpg",), prompt, str(path), row["chosen"], row["rejected"]),
    ]
    assert _errors(tally) == [("identical_answers", "3"), ("missing_field", None)]
    assert tally.counts["read"] == 4


def _completion(model: str, response: str, *ratings: str) -> dict:
    aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    annotations = {
        a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings, strict=True)
    }
    return {"annotations": annotations, "model": model, "response": response}


def test_vlfeedback_best_against_worst_by_mean_rating(tmp_path: Path) -> None:
    rows = [
        {
            "id": "svit-1",
            "prompt": "<image>\nWhat is on the table?",
            "models": ["a", "b", "c", "d"],
            "completions": [
                _completion("a", "A cup.", "4", "4", "5"),  # 4.33
                _completion("b", "A cup and a cat.", "3", "1", "5"),  # 3.0
                _completion("c", "A cup on a table.", "5", "5", "5"),  # 5.0: chosen
                _completion("d", "Nothing.", "N/A", "N/A", "N/A"),  # unrated: left out
            ],
            "img_path": "svit/1.jpg",
        },
        {
            "id": "tie",
            "prompt": "Q?",
            "models": ["a", "b"],
            "completions": [
                _completion("a", "x", "3", "3", "3"),
                _completion("b", "y", "3", "3", "3"),
            ],
            "img_path": "t.jpg",
        },
    ]
    path = _write(tmp_path / "vlfeedback_80k.jsonl", rows, jsonl=True)
    records, tally = _run("vlfeedback", path)
    assert records == [
        Record(
            "svit-1",
            ("svit/1.jpg",),
            (Turn("user", "<image>\nWhat is on the table?"),),
            str(path),
            "A cup on a table.",
            "A cup and a cat.",
        )
    ]
    assert _errors(tally) == [("no_pair", "tie")]
    assert [(c.kind, c.record_id) for c in tally.changes] == [("unrated_completion", "svit-1")]


def test_llava_rlhf_preference_picks_the_output(tmp_path: Path) -> None:
    conversations = [
        {"from": "human", "value": "<image>\nHow many people?"},
        {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "What are they holding?"},
    ]
    rows = [
        {
            "id": "r1",
            "image": "coco/5.jpg",
            "conversations": conversations,
            "output_1": {"from": "llava", "value": "Umbrellas."},
            "output_2": {"from": "llava", "value": "Surfboards."},
            "preference": 2,
            "hallucination": 0,
        },
        {**{"id": "r2", "image": "coco/5.jpg", "conversations": conversations},
         "output_1": "A", "output_2": "B", "preference": 3},
        {**{"id": "r3", "image": "coco/5.jpg", "conversations": conversations[:2]},
         "output_1": "A", "output_2": "B", "preference": 1},
    ]  # fmt: skip
    path = _write(tmp_path / "llava_7b_v1_preference.json", rows)
    records, tally = _run("llava_rlhf", path)
    assert len(records) == 1
    assert records[0].turns[1:] == (
        Turn("assistant", "Two."),
        Turn("user", "What are they holding?"),
    )
    assert (records[0].chosen, records[0].rejected) == ("Surfboards.", "Umbrellas.")
    assert _errors(tally) == [("bad_preference", "r2"), ("trailing_assistant_turn", "r3")]


def test_a_build_may_not_mix_preference_and_training_sources(tmp_path: Path) -> None:
    config = tmp_path / "build.yaml"
    config.write_text(
        "image_root: .\noutput: out.json\nsources:\n"
        "  - {name: a, format: llava, path: a.json}\n"
        "  - {name: b, format: rlaif_v, path: b.json}\n",
        encoding="utf-8",
    )
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(ConfigError, match="mixes preference sources"):
        load_config(config)


def test_a_build_of_preference_sources_writes_preference_records(tmp_path: Path) -> None:
    from PIL import Image

    from dataprocess.__main__ import main
    from dataprocess.reading import iter_raw_records
    from dataprocess.schema import parse_record

    (tmp_path / "img").mkdir()
    for name in ("1.jpg", "5.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / name)
    _write(tmp_path / "rlaif.jsonl", [{"idx": "1", "image": "1.jpg", "question": "Q?",
                                       "chosen": "A red square.", "rejected": "A cat."}], jsonl=True)  # fmt: skip
    _write(tmp_path / "rlhf.json", [{"id": "r1", "image": "5.jpg", "preference": 1,
                                     "conversations": [{"from": "human", "value": "<image>\nWhat?"}],
                                     "output_1": {"value": "Red."}, "output_2": {"value": "Blue."}}])  # fmt: skip
    config = tmp_path / "build.yaml"
    config.write_text(
        "image_root: img\noutput: out/pairs.json\nsources:\n"
        "  - {name: rlaifv, format: rlaif_v, path: rlaif.jsonl}\n"
        "  - {name: rlhf, format: llava_rlhf, path: rlhf.json}\n",
        encoding="utf-8",
    )
    assert main(["build", "--config", str(config)]) == 0
    records = {r.id: r for _, raw in iter_raw_records(tmp_path / "out" / "pairs.json")
               for r in [parse_record(raw)]}  # fmt: skip
    assert (
        records["rlaifv_1"].chosen == "A red square." and records["rlaifv_1"].rejected == "A cat."
    )
    assert records["rlhf_r1"].images == ("5.jpg",) and records["rlhf_r1"].chosen == "Red."
