"""A benchmark is named in one place (`runtime/evaluation/registry.py`): registering one there
makes it a `--benchmark` choice, loaded, screened and scored, with nothing else to edit."""

from __future__ import annotations

import json

from runtime.evaluation import cli
from runtime.evaluation.questions import single_turn
from runtime.evaluation.registry import BENCHMARKS, Benchmark


def test_a_benchmark_registered_once_runs_end_to_end(tmp_path, monkeypatch):
    def load(data, folder, args):
        return [single_turn(f"q{i}", f"Question {i}?", None, reference="yes") for i in range(4)]

    def score(questions, answers):
        right = [answers.get(q.question_id) == q.reference for q in questions]
        return {"scores": {"right": 100.0 * sum(right) / len(right)}, "breakdown": {}}

    monkeypatch.setitem(BENCHMARKS, "toy", Benchmark(load, score, multiple_choice=False))
    answers = tmp_path / "answers.jsonl"
    rows = [{"question_id": f"q{i}", "answer": "yes" if i else "no"} for i in range(4)]
    answers.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    report = cli.main(["--benchmark", "toy", "--data", str(answers), "--answers", str(answers),
                       "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert report["benchmark"] == "toy" and report["scores"] == {"right": 75.0}
    assert report["counts"] == {"questions": 4, "answered": 4, "missing": 0, "unparsed": 0}


def test_every_benchmark_loads_and_scores():
    assert set(BENCHMARKS) == {"mme", "pope", "mmbench", "scienceqa", "textvqa", "records"}
    assert {name for name, b in BENCHMARKS.items() if b.multiple_choice} == {"mmbench", "scienceqa"}
