"""Answering a benchmark in batches, resumably: OUTPUT_DIR/answers.jsonl grows as answers come.

Each batch's answers are appended (`{"question_id", "answer"}` per line) and flushed to disk
before the next batch starts, so a killed run loses at most the batch in flight; a rerun reads
the file back, drops a half-written last line, and answers only the questions not in it.
`run.json` records what the answers belong to (benchmark, data and model by path and by content
fingerprint, generation settings); a rerun with other settings, or with a model retrained or data
edited at the same path, is refused instead of mixing two runs in one file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from runtime.evaluation.questions import Question, decode_image
from runtime.outputs import write_text_atomic

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
RUN_FILE = "run.json"
# run.json keys that name contents rather than settings: what a difference there means
_CHANGES = {
    "model_content": "model_content: the model at --model_weights changed, e.g. retrained in place",
    "data_content": "data_content: the --data files changed",
}
EVALUATION_BATCH_SIZE = 8  # questions per generate call, unless --batch_size


def read_answers(path: Path, *, repair: bool = False) -> dict[str, str]:
    """`{question_id: answer}` from a JSONL file (`answer`, or LLaVA's `text`, per line).

    With `repair`, a last line cut short by a kill is removed from the file (it was never
    flushed whole); anywhere else a line that does not parse is an error naming it.
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if repair and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as file:
            file.truncate(len(data))
    answers = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["answer"] if "answer" in row else row["text"]
            answers[str(row["question_id"])] = str(text)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f'{path}, line {number}: expected {{"question_id": ..., "answer": ...}} ({error})'
            ) from None
    return answers


def check_run(output_dir: Path, description: dict, *, overwrite: bool) -> None:
    """Write `run.json`, or check that an existing one describes the same run.

    A different run in the same directory is refused unless `overwrite`, which discards its
    answers (the only way to mix nothing up)."""
    run_file = output_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous != description:
            if not overwrite:
                changed = sorted(k for k in {*previous, *description}
                                 if previous.get(k) != description.get(k))  # fmt: skip
                what = ", ".join(_CHANGES.get(key, key) for key in changed)
                raise ValueError(
                    f"--output_dir {output_dir}: holds answers of another run (different "
                    f"{what}); its answers and this run's would be scored together: choose "
                    "another directory or pass --overwrite (discards them)"
                )
            (output_dir / ANSWERS_FILE).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(description, indent=1, ensure_ascii=False))


def _batches(questions: list[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(questions), size):
        yield questions[start : start + size]


def answer_batches(
    session, questions: list[Question], batch_size: int
) -> Iterator[list[tuple[Question, str]]]:
    """(question, reply) pairs, one batch per `answer_batch` call. Similar lengths share a batch
    (less padding), so the same questions and batch size always form the same batches."""
    ordered = sorted(questions, key=lambda q: (len(q.images), sum(len(c) for c in q.contents)))
    for batch in _batches(ordered, batch_size):
        replies = session.answer_batch(
            [(q.roles, q.contents) for q in batch],
            [[decode_image(image, q.question_id) for image in q.images] for q in batch],
            system_prompts=[q.system_prompt for q in batch],
        )
        yield list(zip(batch, replies, strict=True))


def answer_questions(
    session, questions: list[Question], output_dir: Path, batch_size: int, progress: bool = True
) -> dict[str, str]:
    """Answers to every question, generating only those not yet in answers.jsonl."""
    from tqdm import tqdm

    path = output_dir / ANSWERS_FILE
    answers = read_answers(path, repair=True)
    pending = [q for q in questions if q.question_id not in answers]
    if len(pending) < len(questions):
        logger.info("resuming: %d of %d questions already answered",
                    len(questions) - len(pending), len(questions))  # fmt: skip
    bar = tqdm(total=len(questions), initial=len(questions) - len(pending), unit="question",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    with path.open("a", encoding="utf-8") as file, bar:
        for pairs in answer_batches(session, pending, batch_size):
            for question, reply in pairs:
                row = {"question_id": question.question_id, "answer": reply}
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
                answers[question.question_id] = reply
            file.flush()
            os.fsync(file.fileno())
            bar.update(len(pairs))
    return answers
