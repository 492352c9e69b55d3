"""Benchmark files with faults: a missing MME image and a bad MMBench image cell are skippable
and named with benchmark and file; an MMBench TSV without categories says so; duplicate question
ids are refused naming the id and file; an answers file matching no question exits non-zero."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluation import mmbench_row, mmbench_tsv, write_image

from runtime.evaluation import cli
from runtime.evaluation.loaders import load_pope, load_records, load_textvqa
from runtime.evaluation.mmbench import load_mmbench

ROOT = Path(__file__).resolve().parents[1]


def _answers(path: Path, ids: list[str], answer: str = "yes") -> Path:
    path.write_text("".join(json.dumps({"question_id": i, "answer": answer}) + "\n" for i in ids))
    return path


def _mme(root: Path) -> Path:
    for stem in ("0001", "0002"):
        write_image(root / "existence" / f"{stem}.png")
        (root / "existence" / f"{stem}.txt").write_text(
            f"Is there a dog {stem}? Please answer yes or no.\tYes\n"
            f"Is there a cat {stem}? Please answer yes or no.\tNo\n",
            encoding="utf-8",
        )
    (root / "existence" / "0002.png").unlink()
    return root


def test_a_missing_mme_image_is_skipped_and_counted(tmp_path):
    data = _mme(tmp_path / "MME")
    answers = _answers(tmp_path / "a.jsonl", ["existence/0001.png/0", "existence/0001.png/1"])
    common = ["--benchmark", "mme", "--data", str(data), "--answers", str(answers)]
    with pytest.raises(ValueError, match=r"mme .*MME: 2 question\(s\).*0002.txt: no image named"):
        cli.main([*common, "--output_dir", str(tmp_path / "a")])
    report = cli.main([*common, "--output_dir", str(tmp_path / "b"), "--skip_bad_questions"])
    assert len(report["skipped"]) == 2 and report["counts"]["questions"] == 2


@pytest.mark.parametrize(
    ("cell", "why"),
    [
        (float("nan"), "the image cell is empty"),
        ("this is not base64!", "the image cell is not base64"),
        ("77", "the image cell refers to row 77, which is not in the file"),
    ],
)
def test_a_bad_mmbench_image_cell_names_benchmark_and_file_and_is_skippable(tmp_path, cell, why):
    data = mmbench_tsv(
        tmp_path / "MMBench_DEV_EN.tsv", [mmbench_row(1), mmbench_row(2, image=cell)]
    )
    answers = _answers(tmp_path / "a.jsonl", ["1"], "B")
    common = ["--benchmark", "mmbench", "--data", str(data), "--answers", str(answers)]
    with pytest.raises(ValueError, match=rf"mmbench {data}: .*question 2: {why}"):
        cli.main([*common, "--output_dir", str(tmp_path / "a")])
    report = cli.main([*common, "--output_dir", str(tmp_path / "b"), "--skip_bad_questions"])
    assert {s["question_id"] for s in report["skipped"]} == {"2", "1000002", "2000002", "3000002"}
    assert report["counts"]["questions"] == 4


def test_an_mmbench_tsv_without_categories_is_scored_with_a_warning(tmp_path, caplog):
    rows = [mmbench_row(1), mmbench_row(2)]
    for row in rows:
        del row["category"], row["l2-category"]
    data = mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    with caplog.at_level(logging.WARNING):
        assert len(load_mmbench(data)) == 8
    assert f"mmbench {data}: no category or l2-category column(s)" in caplog.text


def test_duplicate_question_ids_are_refused_naming_id_and_file(tmp_path):
    images = tmp_path / "val2014"
    write_image(images / "a.jpg")
    pope = tmp_path / "coco_pope_random.json"
    row = {"question_id": 7, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
    pope.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "no"}) + "\n")
    with pytest.raises(ValueError, match=rf"{pope}: question id 'random/7' occurs more than once"):
        load_pope(pope, images)
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"id": "r1", "conversations": turns}] * 2))
    with pytest.raises(ValueError, match=rf"{records}: question id 'r1' occurs more than once"):
        load_records(records, None)
    textvqa = tmp_path / "TextVQA_0.5.1_val.json"
    question = {"question_id": 3, "question": "What?", "image_id": "x", "answers": ["a"] * 10}
    textvqa.write_text(json.dumps({"data": [question, question]}))
    with pytest.raises(ValueError, match=rf"{textvqa}: question id '3' occurs more than once"):
        load_textvqa(textvqa, tmp_path)
    tsv = mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [mmbench_row(4), mmbench_row(4)])
    with pytest.raises(ValueError, match=rf"{tsv}: question id '4' occurs more than once"):
        load_mmbench(tsv)


@pytest.mark.slow
def test_an_answers_file_matching_no_question_exits_non_zero(tmp_path, caplog):
    images = tmp_path / "val2014"
    write_image(images / "a.jpg")
    pope = tmp_path / "coco_pope_random.json"
    row = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
    pope.write_text(json.dumps(row) + "\n")
    answers = _answers(tmp_path / "theirs.jsonl", ["1", "2"])  # no "random/" prefix
    out = tmp_path / "out"
    argv = ["--benchmark", "pope", "--data", str(pope), "--image_folder", str(images)]
    argv += ["--answers", str(answers), "--output_dir", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "runtime.evaluation", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"--answers {answers}: none of its 2 question ids" in done.stderr
    assert "'random/1'" in done.stderr and not out.exists()
    partly = _answers(tmp_path / "p.jsonl", ["random/1", "2"])
    with caplog.at_level(logging.WARNING):
        report = cli.main(argv[:-4] + ["--answers", str(partly), "--output_dir", str(out)])
    assert report["counts"]["answered"] == 1 and "1 of its 2 ids match no question" in caplog.text
    with pytest.raises(ValueError, match="holds no answers"):
        cli.main(argv[:-4] + ["--answers", str(_answers(tmp_path / "e.jsonl", []))] + argv[-2:])


def test_a_good_embedded_image_still_decodes(tmp_path):
    cell = " ".join(base64.b64encode(b"x" * 60).decode("ascii"))  # whitespace is not a fault
    rows = [mmbench_row(1, image=mmbench_row(1)["image"]), mmbench_row(2, image=cell)]
    questions = load_mmbench(mmbench_tsv(tmp_path / "t.tsv", rows))
    assert all(q.problem is None for q in questions)
    assert questions[-1].images[0] == b"x" * 60
