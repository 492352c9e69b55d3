"""`test.py --data_path`: held-out records answered and scored by the evaluator's records path.

The same loader (`loaders.load_records`), screening, batched answering (`runner.answer_batches`)
and scorer (`scoring.score("records", ...)`) as `python -m runtime.evaluation --benchmark
records`, so both give the same score for the same records, checkpoint and batch size. Only the
report differs: `test.py`'s `--output_file` is one JSON file (exact match as a fraction, overall
and by the number of questions asked, and every answer), rewritten after each batch so that an
interrupted run keeps the answers so far.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from runtime.evaluation.loaders import load_records
from runtime.evaluation.questions import Question, screen_questions
from runtime.evaluation.runner import answer_batches
from runtime.evaluation.scoring import exact_match, score
from runtime.outputs import write_text_atomic
from visual import ImageLoadError, load_image

logger = logging.getLogger(__name__)


def evaluate_held_out(
    session,
    data_path: Path,
    image_folder: Path | None,
    *,
    batch_size: int,
    allow_outside: bool = False,
    skip_bad_images: bool = False,
    output_file: str | None = None,
    on_answer: Callable[[Question, str], None] | None = None,
) -> dict:
    """Answer every record's last user turn (the earlier turns as history); returns the report
    (also written to `output_file`). `on_answer(question, reply)` sees each answer as it comes."""
    questions = load_records(data_path, image_folder, allow_outside=allow_outside)
    if not questions:
        raise ValueError(f"--data_path {data_path}: no records to evaluate")
    questions, problems = screen_questions(
        questions,
        f"--data_path {data_path}",
        multiple_choice=False,
        skip=skip_bad_images,
        skip_flag="--skip_bad_images",
    )
    skipped = [{"id": p["question_id"], "error": p["problem"]} for p in problems]
    if skip_bad_images:  # a file that is there but does not decode is skipped too
        questions, undecodable = _decodable(questions)
        skipped += undecodable
    answers: dict[str, str] = {}
    for pairs in answer_batches(session, questions, batch_size):
        for question, reply in pairs:
            answers[question.question_id] = reply
            if on_answer is not None:
                on_answer(question, reply)
        _write(output_file, held_out_report(data_path, questions, answers, skipped))
    if not answers:
        raise ValueError(f"--data_path {data_path}: no records to evaluate (all skipped)")
    return held_out_report(data_path, questions, answers, skipped)


def held_out_report(
    data_path: Path, questions: list[Question], answers: dict[str, str], skipped: list[dict]
) -> dict:
    """`test.py`'s report of the questions answered so far: the records scorer's numbers as
    fractions, and every answer in file order."""
    answered = [q for q in questions if q.question_id in answers]
    result = score("records", answered, answers)
    by_turns = result["breakdown"]["by questions asked"]
    rows = [
        {"id": q.question_id, "turns": q.meta["turns"], "prediction": answers[q.question_id],
         "reference": q.reference, "correct": exact_match(answers[q.question_id], q.reference)}
        for q in answered
    ]  # fmt: skip
    return {
        "data_path": str(data_path),
        "num_records": len(answered),
        "exact_match": result["scores"]["exact_match"] / 100,
        "exact_match_by_turns": {n: row["exact_match"] / 100 for n, row in by_turns.items()},
        "skipped": skipped,
        "answers": rows,
    }


def _decodable(questions: list[Question]) -> tuple[list[Question], list[dict]]:
    """The questions whose images all decode, and the others as {id, error}."""
    kept, skipped = [], []
    for question in questions:
        try:
            for image in question.images:
                load_image(image)
        except ImageLoadError as error:
            logger.warning("skipped record %r: %s", question.question_id, error)
            skipped.append({"id": question.question_id, "error": str(error)})
            continue
        kept.append(question)
    return kept, skipped


def _write(output_file: str | None, report: dict) -> None:
    if output_file:
        write_text_atomic(output_file, json.dumps(report, ensure_ascii=False, indent=1))
