"""What every benchmark loader produces: questions with their prompts, images and references.

The prompt wording follows each benchmark's reference evaluation (LLaVA-1.5's `llava/eval`
scripts and lmms-eval's task files), so scores are comparable with published ones; the chat
layout around it is the model's own (`InferenceSession.prompt_ids`), never re-spelled here.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.cli import with_image_marker
from visual import ImageLoadError, load_image

LETTERS = "ABCDEFGHIJ"
# The instruction lines appended to the question (LLaVA-1.5 / lmms-eval conventions).
CHOICE_INSTRUCTION = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接回答选项字母。",
}
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Please answer yes or no."
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class Question:
    """One question: the conversation to answer (ending with a user turn) and how to score it.

    `images` are file paths or encoded image bytes (TSV / parquet benchmarks), one per `<image>`
    marker. `group` ties questions scored together (an MME image's two questions, an MMBench
    question's rotations); `meta` holds the fields the breakdowns use (category, split, ...).
    `problem` is set by a loader that found the question unaskable (an MME text file without its
    image, an empty or non-base64 MMBench image cell): it is skipped or refused like the rest.
    """

    question_id: str
    roles: tuple[str, ...]
    contents: tuple[str, ...]
    images: tuple[Path | bytes, ...] = ()
    reference: Any = None
    options: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    system_prompt: str | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        self.group = self.group or self.question_id

    @property
    def prompt(self) -> str:
        return self.contents[-1]


def single_turn(question_id: str, text: str, image: Path | bytes | None, **fields) -> Question:
    """A one-turn question; an image gets the `<image>` marker in front, as test.py puts it."""
    images = () if image is None else (image,)
    content = with_image_marker(text, len(images))
    return Question(question_id, ("user",), (content,), images, **fields)


def language_of(text: str, lang: str = "auto") -> str:
    """ "zh" for text with Chinese characters (or when asked), else "en"."""
    if lang != "auto":
        return lang
    return "zh" if _CJK.search(text) else "en"


def choice_prompt(
    question: str, options: dict[str, str], hint: str | None = None, lang: str = "auto"
) -> str:
    """LLaVA-1.5's multiple-choice prompt (model_vqa_mmbench / ScienceQA single-pred-prompt):
    hint line, question, one "A. text" line per option, then the answer-with-a-letter line."""
    lines = [hint] if hint else []
    lines.append(question)
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(CHOICE_INSTRUCTION[language_of("\n".join(lines), lang)])
    return "\n".join(lines)


def short_answer_prompt(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER_INSTRUCTION}"


def yes_no_prompt(question: str) -> str:
    """MME questions already end with "Please answer yes or no."; POPE's get it appended."""
    question = question.strip()
    if question.endswith(YES_NO_INSTRUCTION):
        return question
    return f"{question} {YES_NO_INSTRUCTION}"


def decode_image(image: Path | bytes, question_id: str) -> Path | Image.Image:
    """A path as is (the session loads it); encoded bytes decoded here, naming the question."""
    if isinstance(image, Path):
        return image
    try:
        return load_image(image)
    except ImageLoadError as error:
        message = f"question {question_id}: its embedded image does not decode: {error}"
        raise ValueError(message) from None


def refuse_duplicate_ids(questions: list[Question], source: Path | str) -> list[Question]:
    """`questions`, or a ValueError naming the first id that occurs twice and its file: answers
    are matched by id, so one answer would be scored against two references."""
    seen: set[str] = set()
    for question in questions:
        if question.question_id in seen:
            raise ValueError(
                f"{source}: question id {question.question_id!r} occurs more than once; "
                "ids must be unique (answers are matched to questions by id)"
            )
        seen.add(question.question_id)
    return questions


def limit_groups(questions: list[Question], limit: int | None) -> list[Question]:
    """The questions of the first `limit` groups (whole groups, so paired scores stay valid)."""
    if limit is None:
        return questions
    kept: set[str] = set()
    out = []
    for question in questions:
        if question.group not in kept:
            if len(kept) == limit:
                continue
            kept.add(question.group)
        out.append(question)
    return out


def question_problem(question: Question, multiple_choice: bool) -> str | None:
    """Why `question` cannot be asked or scored (a missing image file, an embedded image that
    does not decode, a multiple-choice row with fewer than two options), or None."""
    if question.problem is not None:
        return question.problem
    if multiple_choice and len(question.options) < 2:
        return f"{len(question.options)} option(s); a multiple-choice question needs two or more"
    for image in question.images:
        if isinstance(image, Path):
            if not image.is_file():
                return f"image file missing: {image}"
            continue
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.verify()  # header and structure, without a full decode
        except Exception as error:  # PIL raises many types for corrupt data; all mean unusable
            return f"its embedded image does not decode ({type(error).__name__}: {error})"
    return None


def screen_questions(
    questions: list[Question],
    where: str,
    *,
    multiple_choice: bool,
    skip: bool,
    skip_flag: str = "--skip_bad_questions",
) -> tuple[list[Question], list[dict]]:
    """The questions that can be asked, and the skipped ones as {question_id, problem}.

    A bad question stops the run (naming `where` - benchmark and file - and the first questions)
    unless `skip`; then its whole group (an MMBench question's rotations, an MME image's pair)
    is left out and counted, so no score is computed over half a group.
    """
    problems = {}
    for question in questions:
        problem = question_problem(question, multiple_choice)
        if problem is not None:
            problems[question.question_id] = problem
    if not problems:
        return questions, []
    examples = "; ".join(f"question {qid}: {why}" for qid, why in list(problems.items())[:3])
    if not skip:
        raise ValueError(
            f"{where}: {len(problems)} question(s) cannot be asked or scored, e.g. {examples}; "
            f"fix the files (or --image_folder) or pass {skip_flag} to skip and count them"
        )
    bad_groups = {q.group for q in questions if q.question_id in problems}
    kept = [q for q in questions if q.group not in bad_groups]
    skipped = [
        {"question_id": q.question_id, "problem": problems.get(q.question_id, "in a bad group")}
        for q in questions
        if q.group in bad_groups
    ]
    return kept, skipped
