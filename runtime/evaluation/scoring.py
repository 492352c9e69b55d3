"""Scores by each benchmark's official rules, from the questions and the raw answer texts.

Every scorer returns `{"scores": {...}, "breakdown": {table: {row: {metric: value}}},
"unparsed": n}`; percentages are 0-100 except MME's points. An answer that names no option /
neither yes nor no is unparsed and counts as wrong; a question with no answer at all is missing
and counts as wrong too (`score` reports both counts).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from runtime.evaluation.extraction import extract_choice, extract_yes_no
from runtime.evaluation.loaders import MME_COGNITION, MME_PERCEPTION
from runtime.evaluation.questions import Question
from runtime.evaluation.vqa_accuracy import vqa_accuracy

logger = logging.getLogger(__name__)
SCIENCEQA_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def normalise_answer(text: str) -> str:
    """Case, surrounding space, runs of spaces and a final full stop / exclamation mark ignored."""
    return " ".join(text.strip().lower().rstrip(".。!！").split())


def exact_match(prediction: str, reference: str) -> bool:
    """The records' metric (`test.py --data_path`, `--benchmark records`, the export parity)."""
    return normalise_answer(prediction) == normalise_answer(reference)


def _percent(flags: list) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def score_mme(questions: list[Question], answers: dict[str, str]) -> dict:
    """Per subtask: acc (% of questions right) + acc+ (% of images with every question right);
    perception = the sum over its 10 subtasks (max 2000), cognition over its 4 (max 800)."""
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unparsed = 0
    for question in questions:
        said = extract_yes_no(answers.get(question.question_id, ""))
        unparsed += said is None and question.question_id in answers
        images[question.meta["category"]][question.group].append(said == question.reference)
    subtasks = {}
    for category, per_image in images.items():
        flags = [flag for image in per_image.values() for flag in image]
        acc, acc_plus = _percent(flags), _percent([all(f) for f in per_image.values()])
        subtasks[category] = {"score": acc + acc_plus, "acc": acc, "acc+": acc_plus,
                              "questions": len(flags)}  # fmt: skip
    order = [c for c in (*MME_PERCEPTION, *MME_COGNITION) if c in subtasks]
    order += sorted(set(subtasks) - set(order))
    perception = sum(subtasks[c]["score"] for c in subtasks if c in MME_PERCEPTION)
    cognition = sum(subtasks[c]["score"] for c in subtasks if c in MME_COGNITION)
    scores = {"perception": perception, "cognition": cognition, "total": perception + cognition}
    return {"scores": scores, "breakdown": {"by subtask": {c: subtasks[c] for c in order}},
            "unparsed": unparsed}  # fmt: skip


def pope_metrics(labels: list[str], predictions: list[str | None]) -> dict:
    """Accuracy, precision, recall, F1 of "yes" (the positive class) and the yes ratio, in %.
    An unparsed answer (None) is neither a yes nor a no: wrong, and a missed positive."""
    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(label == "yes" and said == "yes" for label, said in pairs)
    fp = sum(label == "no" and said == "yes" for label, said in pairs)
    tn = sum(label == "no" and said == "no" for label, said in pairs)
    positives = sum(label == "yes" for label, _ in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(said == "yes" for _, said in pairs) / len(pairs) if pairs else 0.0,
        "questions": len(pairs),
    }


def score_pope(questions: list[Question], answers: dict[str, str]) -> dict:
    """POPE metrics per split (random / popular / adversarial) and their mean over splits."""
    by_split: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    unparsed = 0
    for question in questions:
        said = extract_yes_no(answers.get(question.question_id, ""))
        unparsed += said is None and question.question_id in answers
        labels, predictions = by_split[question.meta["split"]]
        labels.append(question.reference)
        predictions.append(said)
    splits = {name: pope_metrics(*pair) for name, pair in sorted(by_split.items())}
    names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {name: sum(s[name] for s in splits.values()) / len(splits) for name in names}
    return {"scores": mean, "breakdown": {"by split": splits}, "unparsed": unparsed}


def score_scienceqa(questions: list[Question], answers: dict[str, str]) -> dict:
    """Accuracy overall, by subject (NAT / SOC / LAN), context (TXT: with a text hint; IMG: with
    an image, i.e. all of ScienceQA-IMG) and grade band."""
    tables: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    flags, unparsed = [], 0
    for question in questions:
        letter = extract_choice(answers.get(question.question_id, ""), question.options)
        unparsed += letter is None and question.question_id in answers
        right = letter == question.reference
        flags.append(right)
        subject = question.meta["subject"]
        tables["by subject"][SCIENCEQA_SUBJECTS.get(subject, subject)].append(right)
        tables["by context"]["IMG"].append(right)
        if question.meta["has_text"]:
            tables["by context"]["TXT"].append(right)
        tables["by grade"][question.meta["grade"]].append(right)
    breakdown = {
        table: {
            row: {"accuracy": _percent(f), "questions": len(f)} for row, f in sorted(rows.items())
        }
        for table, rows in tables.items()
    }
    return {"scores": {"accuracy": _percent(flags)}, "breakdown": breakdown, "unparsed": unparsed}


def score_textvqa(questions: list[Question], answers: dict[str, str]) -> dict:
    """VQA accuracy of the whole (normalised) answer; an empty answer is unparsed."""
    scored = [q for q in questions if q.reference]
    if not scored:
        return {"scores": {}, "breakdown": {}, "note": "the file holds no answers (a test split?)"}
    values = [vqa_accuracy(answers.get(q.question_id, ""), q.reference) for q in scored]
    unparsed = sum(q.question_id in answers and not answers[q.question_id].strip() for q in scored)
    accuracy = 100.0 * sum(values) / len(values)
    return {"scores": {"vqa_accuracy": accuracy}, "breakdown": {}, "unparsed": unparsed}


def score_records(questions: list[Question], answers: dict[str, str]) -> dict:
    """Exact match of the last answer (`exact_match`), overall and by the number
    of questions asked in the record."""
    by_turns: dict[str, list[bool]] = defaultdict(list)
    flags = []
    for question in questions:
        right = exact_match(answers.get(question.question_id, ""), question.reference)
        flags.append(right)
        by_turns[str(question.meta["turns"])].append(right)
    breakdown = {"by questions asked": {
        turns: {"exact_match": _percent(f), "questions": len(f)} for turns, f in sorted(by_turns.items())
    }}  # fmt: skip
    return {"scores": {"exact_match": _percent(flags)}, "breakdown": breakdown, "unparsed": 0}


def score(benchmark: str, questions: list[Question], answers: dict[str, str]) -> dict:
    """The benchmark's scores plus the counts: questions, answered, missing, unparsed."""
    from runtime.evaluation.registry import BENCHMARKS  # it names these scorers

    result = BENCHMARKS[benchmark].score(questions, answers)
    answered = sum(q.question_id in answers for q in questions)
    result["counts"] = {
        "questions": len(questions),
        "answered": answered,
        "missing": len(questions) - answered,
        "unparsed": result.pop("unparsed", 0),
    }
    return result


def check_answer_ids(questions: list[Question], answers: dict[str, str], source: str) -> None:
    """Refuse an answers file none of whose ids is a question's id (another benchmark, or ids
    spelled another way): scoring it would report 0.00 as if the model answered all wrong."""
    asked = {question.question_id for question in questions}
    if not answers:
        raise ValueError(f"--answers {source}: holds no answers; nothing to score")
    unknown = [question_id for question_id in answers if question_id not in asked]
    if len(unknown) == len(answers):
        raise ValueError(
            f"--answers {source}: none of its {len(answers)} question ids (e.g. "
            f"{unknown[0]!r}) is a question of this benchmark (e.g. "
            f"{next(iter(asked), '')!r}); nothing to score"
        )
    if unknown:
        logger.warning("--answers %s: %d of its %d ids match no question (e.g. %r); not scored",
                       source, len(unknown), len(answers), unknown[0])  # fmt: skip
