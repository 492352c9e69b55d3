"""The preference demo's data: yes-only SFT records, balanced valid pairs, a POPE-layout test set
that `runtime.evaluation --benchmark pope` loads with the prompts the pairs were trained on."""

from __future__ import annotations

import json
from pathlib import Path

from dataprocess.validate import validate_file
from demo.preference import write_demo
from runtime.evaluation.loaders import load_pope


def test_files_are_valid_balanced_and_match_the_evaluation_prompt(tmp_path: Path):
    out = write_demo(tmp_path, num_sft=6, num_pairs=8, num_test=10)
    for name, count in (("yes_sft.json", 6), ("pairs.json", 8)):
        records, tally = validate_file(out / name, out)
        assert len(list(records)) == count and tally.num_invalid == 0
    sft = json.loads((out / "yes_sft.json").read_text())
    assert {r["conversations"][-1]["value"] for r in sft} == {"Yes"}
    pairs = json.loads((out / "pairs.json").read_text())
    assert sorted(p["chosen"] for p in pairs) == ["No"] * 4 + ["Yes"] * 4
    questions = load_pope(out / "coco_pope_shapes.json", out)
    assert sorted(q.reference for q in questions) == ["no"] * 5 + ["yes"] * 5
    trained = {p["conversations"][0]["value"].split(" ", 4)[0] for p in pairs}
    assert all(q.contents[0].startswith("<image>\n") for q in questions)
    assert all(q.contents[0].endswith("Please answer yes or no.") for q in questions)
    assert all(p["conversations"][0]["value"].endswith("Please answer yes or no.") for p in pairs)
    assert trained <= {"<image>\nIs", "<image>\nDoes"}
