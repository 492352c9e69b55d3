"""Benchmark files as users download them -> `Question`s (MMBench's TSVs are in mmbench.py).

Everything is read offline from the files named in docs/EVALUATION.md: MME (the official release
folder, or lmms-lab/MME parquet), POPE (coco_pope_*.json + COCO val2014), ScienceQA-IMG
(problems.json + pid_splits.json + test/{pid}/image.png), TextVQA (TextVQA_0.5.1_val.json +
train_images/) and our own training records. A missing file or image names the path and the flag
that sets it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dataprocess.reading import iter_raw_records
from dataprocess.schema import confined_image_path, parse_record
from runtime.evaluation.questions import (
    LETTERS,
    Question,
    choice_prompt,
    refuse_duplicate_ids,
    short_answer_prompt,
    single_turn,
    yes_no_prompt,
)

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def read_parquet_rows(path: Path) -> list[dict]:
    """Rows of one parquet file, or of every parquet file under a folder (sorted by name)."""
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"--data {path}: no parquet files")
    return [row for file in files for row in pq.read_table(file).to_pylist()]


def _mme_question(category: str, image_name: str, k: int, text: str, answer: str, image):
    return single_turn(
        f"{category}/{image_name}/{k}", yes_no_prompt(text), image,
        reference=answer.strip().lower().rstrip("."), meta={"category": category},
        group=f"{category}/{image_name}",
    )  # fmt: skip


def load_mme(data: Path) -> list[Question]:
    """MME: the official release folder (one folder per subtask) or lmms-lab/MME parquet files."""
    parquet = data.suffix == ".parquet" or (data.is_dir() and any(data.rglob("*.parquet")))
    if parquet:
        counts: dict[str, int] = {}
        questions = []
        for row in read_parquet_rows(data):
            category, image_name = row["category"], Path(str(row["question_id"])).name
            key = f"{category}/{image_name}"
            k = counts[key] = counts.get(key, -1) + 1  # the image's first or second question
            image = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
            questions.append(
                _mme_question(category, image_name, k, row["question"], row["answer"], image)
            )
        return questions
    subtasks = [data / name for name in (*MME_PERCEPTION, *MME_COGNITION) if (data / name).is_dir()]
    if not subtasks:
        raise FileNotFoundError(
            f"--data {data}: neither parquet files nor MME subtask folders "
            f"({', '.join(MME_PERCEPTION[:3])}, ...) are there"
        )
    return [q for folder in subtasks for q in _mme_subtask(folder)]


def _mme_subtask(folder: Path) -> list[Question]:
    """One subtask: `question<TAB>answer` lines in `{image stem}.txt`, next to the images or in
    `questions_answers_YN/` beside `images/` (artwork, celebrity, landmark, posters, scene)."""
    images_dir, answers_dir = folder, folder
    if (folder / "images").is_dir():
        images_dir, answers_dir = folder / "images", folder / "questions_answers_YN"
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    questions = []
    for txt in sorted(answers_dir.glob("*.txt")):
        # A missing image makes its questions unaskable (skipped with --skip_bad_questions).
        image = images.get(txt.stem, images_dir / f"{txt.stem}.*")
        problem = None if txt.stem in images else f"{txt}: no image named {txt.stem}.* beside it"
        lines = [line for line in txt.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        for k, line in enumerate(lines):
            if "\t" not in line:
                raise ValueError(f"{txt}, line {k + 1}: expected 'question<TAB>answer'")
            text, answer = line.rsplit("\t", 1)
            question = _mme_question(folder.name, image.name, k, text, answer, image)
            question.problem = problem
            questions.append(question)
    return questions


def load_pope(data: Path, image_folder: Path | None) -> list[Question]:
    """POPE: coco_pope_{random,popular,adversarial}.json (JSON lines {question_id, image, text,
    label}), one file or a folder of them; images from COCO val2014 in `--image_folder`."""
    files = sorted(data.glob("*.json")) if data.is_dir() else [data]
    if not files:
        raise FileNotFoundError(f"--data {data}: no coco_pope_*.json files")
    if image_folder is None:
        raise ValueError("--benchmark pope needs --image_folder (the COCO val2014 images)")
    questions = []
    for file in files:
        questions += refuse_duplicate_ids(_pope_file(file, image_folder), file)
    return questions


def _pope_file(file: Path, image_folder: Path) -> list[Question]:
    """The questions of one coco_pope_<split>.json file (JSON lines)."""
    questions = []
    split = file.stem.removeprefix("coco_pope_")
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = single_turn(
                f"{split}/{row['question_id']}", yes_no_prompt(row["text"]),
                image_folder / row["image"], reference=row["label"].strip().lower(),
                meta={"split": split},
            )  # fmt: skip
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise ValueError(f"{file}, line {number}: not a POPE question ({error})") from None
        questions.append(question)
    return questions


def load_scienceqa(data: Path, image_folder: Path | None, split: str = "test") -> list[Question]:
    """ScienceQA-IMG: the `split` problems of pid_splits.json that have an image, from
    problems.json; images at `{image_folder}/{split}/{pid}/image.png` (default: beside the json)."""
    folder = data if data.is_dir() else data.parent
    problems_file = data if data.is_file() else folder / "problems.json"
    problems = _read_json(problems_file)
    splits = _read_json(folder / "pid_splits.json")
    if split not in splits:
        raise ValueError(f"--split {split!r}: pid_splits.json has {', '.join(splits)}")
    root = (image_folder or folder) / split
    questions = []
    for pid in splits[split]:
        problem = problems[str(pid)]
        if not problem.get("image"):
            continue
        options = dict(zip(LETTERS, problem["choices"], strict=False))
        hint = (problem.get("hint") or "").strip()
        grade = int("".join(c for c in problem.get("grade", "") if c.isdigit()) or 0)
        meta = {
            "subject": problem.get("subject", ""),
            "has_text": bool(hint),
            "grade": "G1-6" if grade <= 6 else "G7-12",
        }
        text = choice_prompt(problem["question"], options, f"Context: {hint}" if hint else None)
        reference = LETTERS[problem["answer"]]
        questions.append(
            single_turn(
                str(pid),
                text,
                root / str(pid) / problem["image"],
                reference=reference,
                options=options,
                meta=meta,
            )  # fmt: skip
        )
    return refuse_duplicate_ids(questions, folder / "pid_splits.json")


def load_textvqa(data: Path, image_folder: Path | None) -> list[Question]:
    """TextVQA: TextVQA_0.5.1_val.json (`data[]`: question, answers[10], image_id, question_id);
    images at `{image_folder}/train_images/{image_id}.jpg` (or directly in `--image_folder`)."""
    rows = _read_json(data).get("data")
    if not isinstance(rows, list):
        raise ValueError(f"--data {data}: expected a TextVQA file with a 'data' list")
    folder = image_folder or data.parent
    if (folder / "train_images").is_dir():
        folder = folder / "train_images"
    questions = [
        single_turn(
            str(row["question_id"]),
            short_answer_prompt(row["question"]),
            folder / f"{row['image_id']}.jpg",
            reference=row.get("answers"),
        )
        for row in rows
    ]
    return refuse_duplicate_ids(questions, data)


def load_records(
    data: Path, image_folder: Path | None, allow_outside: bool = False
) -> list[Question]:
    """Our training records (LLaVA chat schema): the last assistant turn is the reference, the
    turns before it (system prompt and history included) are the prompt. Images are found under
    `image_folder` (default: the data file's folder), never outside it unless `allow_outside`.
    The one held-out loader: `--benchmark records` and `test.py --data_path`."""
    folder = image_folder or data.parent
    questions = []
    for index, raw in iter_raw_records(data):
        record = parse_record(raw, source=str(data), index=index)
        turns = [t for t in record.turns if t.role != "system"]
        if len(turns) < 2 or turns[-1].role != "assistant":
            raise ValueError(f"{data}, record {record.id!r}: must end with an assistant turn")
        system = next((t.content for t in record.turns if t.role == "system"), None)
        try:
            images = tuple(
                confined_image_path(folder, name, allow_outside=allow_outside)
                for name in record.images
            )
        except ValueError as error:
            raise ValueError(f"{data}, record {record.id!r}: {error}") from None
        questions.append(Question(
            record.id, tuple(t.role for t in turns[:-1]), tuple(t.content for t in turns[:-1]),
            images, reference=turns[-1].content, meta={"turns": len(turns) // 2},
            system_prompt=system,
        ))  # fmt: skip
    return refuse_duplicate_ids(questions, data)


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"--data: {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
