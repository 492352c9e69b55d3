"""MMBench, MMBench-CN and CCBench: the TSV files, their circular rotations, circular scoring.

A TSV row holds `index, question, hint, A, B, C, D, answer, category, l2-category, image` (base64;
in VLMEvalKit's files a short value names the row whose image it shares). MMBench's circular
evaluation asks every question once per rotation of its options; rotations share `index % 1e6`,
and a question counts as right only when every rotation is answered right. Files that already
hold the rotations (rows with index >= 1,000,000) are used as they are; otherwise the rotations
are made here (LLaVA's `--all-rounds`: options shifted by one each round).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections import defaultdict
from pathlib import Path

from runtime.evaluation.extraction import extract_choice
from runtime.evaluation.questions import (
    LETTERS,
    Question,
    choice_prompt,
    refuse_duplicate_ids,
    single_turn,
)

ROTATION = 1_000_000  # index of rotation k of question i: i + k * ROTATION
BREAKDOWN_COLUMNS = ("category", "l2-category")

logger = logging.getLogger(__name__)


def _present(value) -> bool:
    """False for the TSV's empty cells (NaN, "nan", "none", "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() not in ("", "nan", "none")


def load_mmbench(data: Path, lang: str = "auto", rotate: bool = True) -> list[Question]:
    """Questions of an MMBench-style TSV, with circular rotations (made if the file has none)."""
    import pandas as pd

    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such TSV file")
    table = pd.read_csv(data, sep="\t", dtype={"image": str}, keep_default_na=True)
    missing = {"index", "question", "A", "B", "image"} - set(table.columns)
    if missing:
        raise ValueError(f"--data {data}: not an MMBench TSV, no column(s) {sorted(missing)}")
    absent = [name for name in BREAKDOWN_COLUMNS if name not in table.columns]
    if absent:
        logger.warning(
            "mmbench %s: no %s column(s): only the overall accuracy is scored, with no "
            "per-category breakdown", data, " or ".join(absent),
        )  # fmt: skip
    rows = table.to_dict("records")
    images = {int(row["index"]): str(row["image"]) for row in rows}
    has_rotations = any(int(row["index"]) >= ROTATION for row in rows)
    questions = []
    for row in rows:
        index = int(row["index"])
        options = {c: str(row[c]) for c in LETTERS if c in row and _present(row[c])}
        answer = str(row["answer"]).strip() if _present(row.get("answer")) else None
        rounds = 1 if has_rotations or not rotate else len(options)
        for k in range(rounds):
            rotated = dict(zip(options, list(options.values())[k:] + list(options.values())[:k],
                               strict=True))  # fmt: skip
            reference = None
            if answer in options:
                reference = LETTERS[(list(options).index(answer) - k) % len(options)]
            questions.append(_question(row, index + k * ROTATION, rotated, reference, images, lang))
    return refuse_duplicate_ids(questions, data)


def _question(row: dict, index: int, options: dict, reference, images: dict, lang: str):
    hint = str(row["hint"]) if _present(row.get("hint")) else None
    text = choice_prompt(str(row["question"]), options, hint, lang)
    meta = {
        "category": str(row.get("category", "")) if _present(row.get("category")) else "",
        "l2-category": str(row["l2-category"]) if _present(row.get("l2-category")) else "",
    }
    image, problem = _image_bytes(row, images)
    return single_turn(
        str(index), text, image, reference=reference, options=options,
        meta=meta, group=str(index % ROTATION), problem=problem,
    )  # fmt: skip


def _image_bytes(row: dict, images: dict[int, str]) -> tuple[bytes, str | None]:
    """(the row's decoded base64 image, None) or (b"", why not): a bad cell makes its question
    unaskable, skipped or refused by `screen_questions`, which names the benchmark and file.
    A short value is the index of the row holding the image (VLMEvalKit's shared images)."""
    value = str(row["image"]) if _present(row["image"]) else ""
    if len(value) <= 64 and value.strip().isdigit():
        if int(value) not in images:
            return b"", f"the image cell refers to row {value.strip()}, which is not in the file"
        value = images[int(value)]
    if not _present(value):
        return b"", "the image cell is empty"
    try:
        return base64.b64decode("".join(value.split()), validate=True), None
    except (binascii.Error, ValueError) as error:
        return b"", f"the image cell is not base64 ({error})"


def score_mmbench(questions: list[Question], answers: dict[str, str]) -> dict:
    """Circular accuracy (every rotation right), overall, per category and per l2-category; the
    single-pass accuracy of the unrotated questions alongside."""
    groups: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        if question.reference is not None:
            groups[question.group].append(question)
    if not groups:
        return {"scores": {}, "breakdown": {}, "note": "the file holds no answers (a test split?)"}
    hits, single = {}, []
    unparsed = 0
    for group, members in groups.items():
        right = []
        for question in members:
            letter = extract_choice(answers.get(question.question_id, ""), question.options)
            unparsed += letter is None and question.question_id in answers
            right.append(letter == question.reference)
            if question.question_id == group:
                single.append(right[-1])
        hits[group] = all(right)
    main = {q.group: q for q in questions if q.question_id == q.group}
    breakdown = {}
    for field in ("category", "l2-category"):
        table: dict[str, list[bool]] = defaultdict(list)
        for group, hit in hits.items():
            name = main[group].meta.get(field) if group in main else ""
            if name:
                table[name].append(hit)
        if table:
            breakdown[f"by {field}"] = {
                name: {"circular_accuracy": _percent(h), "questions": len(h)}
                for name, h in sorted(table.items())
            }
    scores = {"circular_accuracy": _percent(list(hits.values())), "single_pass_accuracy":
              _percent(single)}  # fmt: skip
    return {"scores": scores, "breakdown": breakdown, "unparsed": unparsed}


def _percent(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0
