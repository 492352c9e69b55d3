"""Benchmark evaluation: each loader reads a tiny fixture written in the benchmark's real format,
each scorer reproduces hand-computed values, free-text answers are read in English and Chinese,
batched answers equal one-at-a-time answers, and a killed run resumes to the same report."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from runtime.evaluation import cli
from runtime.evaluation.extraction import extract_choice, extract_yes_no
from runtime.evaluation.loaders import (
    load_mme,
    load_pope,
    load_records,
    load_scienceqa,
    load_textvqa,
)
from runtime.evaluation.mmbench import load_mmbench
from runtime.evaluation.questions import CHOICE_INSTRUCTION, limit_groups, screen_questions
from runtime.evaluation.runner import read_answers
from runtime.evaluation.scoring import pope_metrics, score
from runtime.evaluation.vqa_accuracy import normalise_vqa_answer, vqa_accuracy


def png_bytes(colour=(255, 0, 0), size=8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(path: Path, colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour))
    return path


# --- fixtures in each benchmark's own format -------------------------------------------------


@pytest.fixture
def mme_folder(tmp_path) -> Path:
    """The official release layout: images beside their txt, or images/ + questions_answers_YN/."""
    root = tmp_path / "MME_Benchmark_release_version"
    for stem in ("0001", "0002"):
        write_image(root / "existence" / f"{stem}.png")
        (root / "existence" / f"{stem}.txt").write_text(
            f"Is there a dog in this image? Please answer yes or no.\tYes\n"
            f"Is there a cat {stem} in this image? Please answer yes or no.\tNo\n",
            encoding="utf-8",
        )
    write_image(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Picasso? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    write_image(root / "code_reasoning" / "0020.png")
    (root / "code_reasoning" / "0020.txt").write_text(
        "Will this code print 3? Please answer yes or no.\tYes\n"
        "Will this code print 4? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    (root / "eval_tool").mkdir()  # shipped with the release; not a subtask
    return root


def test_mme_folder_loader_reads_both_layouts(mme_folder):
    questions = load_mme(mme_folder)
    assert len(questions) == 8
    ids = [q.question_id for q in questions]
    assert "existence/0001.png/0" in ids and "artwork/10002.jpg/1" in ids
    first = questions[0]
    assert first.contents == ("<image>\nIs there a dog in this image? Please answer yes or no.",)
    assert first.reference == "yes" and first.group == "existence/0001.png"
    assert isinstance(first.images[0], Path) and first.images[0].is_file()
    assert {q.meta["category"] for q in questions} == {"existence", "artwork", "code_reasoning"}


def test_mme_parquet_loader_matches_the_folder_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png"],
        "image": [{"bytes": png_bytes(), "path": "0020.png"}] * 2,
        "question": ["Will this code print 3? Please answer yes or no."] * 2,
        "answer": ["Yes", "No"],
        "category": ["code_reasoning"] * 2,
    }
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    questions = load_mme(tmp_path)
    assert [q.question_id for q in questions] == [
        "code_reasoning/0020.png/0",
        "code_reasoning/0020.png/1",
    ]
    assert questions[0].images[0] == png_bytes()
    assert [q.reference for q in questions] == ["yes", "no"]


@pytest.fixture
def pope_files(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "val2014"
    coco = tmp_path / "coco"
    coco.mkdir()
    labels = ["yes", "yes", "yes", "no", "no"]
    lines = []
    for i, label in enumerate(labels, 1):
        name = f"COCO_val2014_{i:012d}.jpg"
        write_image(images / name)
        lines.append(
            json.dumps(
                {
                    "question_id": i,
                    "image": name,
                    "text": f"Is there a thing {i} in the image?",
                    "label": label,
                }
            )
        )
    (coco / "coco_pope_random.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (coco / "coco_pope_adversarial.json").write_text(
        lines[0] + "\n" + lines[3] + "\n", encoding="utf-8"
    )
    return coco, images


def test_pope_loader_and_an_always_yes_answerer(pope_files):
    coco, images = pope_files
    questions = load_pope(coco, images)
    assert len(questions) == 7
    assert questions[0].question_id == "adversarial/1"
    assert (
        questions[0]
        .contents[0]
        .endswith("Is there a thing 1 in the image? Please answer yes or no.")
    )
    report = score("pope", questions, {q.question_id: "Yes, there is." for q in questions})
    random = report["breakdown"]["by split"]["random"]
    # 3 yes / 2 no labels, all answered yes: TP 3, FP 2, TN 0, FN 0.
    assert random["accuracy"] == pytest.approx(60.0)
    assert random["precision"] == pytest.approx(60.0)
    assert random["recall"] == pytest.approx(100.0)
    assert random["f1"] == pytest.approx(75.0)
    assert random["yes_ratio"] == pytest.approx(100.0)
    adversarial = report["breakdown"]["by split"]["adversarial"]  # 1 yes, 1 no
    assert adversarial["accuracy"] == pytest.approx(50.0) and adversarial["f1"] == pytest.approx(
        200 / 3
    )
    assert report["scores"]["accuracy"] == pytest.approx(55.0)  # mean over the two splits


def test_pope_counts_an_unparsed_answer_as_wrong_and_a_missed_positive():
    metrics = pope_metrics(["yes", "no", "yes"], ["yes", "no", None])
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["recall"] == pytest.approx(50.0) and metrics["precision"] == pytest.approx(100.0)


def test_pope_needs_the_image_folder(pope_files, tmp_path):
    coco, _ = pope_files
    with pytest.raises(ValueError, match="--image_folder"):
        load_pope(coco, None)
    questions = load_pope(coco / "coco_pope_random.json", tmp_path)  # the wrong folder
    with pytest.raises(
        ValueError, match=r"pope X: 5 question\(s\).*image file missing.*--skip_bad"
    ):
        screen_questions(questions, "pope X", multiple_choice=False, skip=False)


def test_bad_questions_are_skipped_and_counted_with_their_whole_group(pope_files, tmp_path):
    coco, images = pope_files
    (images / "COCO_val2014_000000000002.jpg").unlink()
    answers = tmp_path / "theirs.jsonl"
    rows = [{"question_id": f"random/{i}", "answer": "yes" if i < 4 else "no"} for i in range(1, 6)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--benchmark", "pope", "--data", str(coco / "coco_pope_random.json"),
              "--image_folder", str(images), "--answers", str(answers)]  # fmt: skip
    with pytest.raises(ValueError, match="question random/2: image file missing"):
        cli.main([*common, "--output_dir", str(tmp_path / "a")])
    report = cli.main([*common, "--output_dir", str(tmp_path / "b"), "--skip_bad_questions"])
    assert [s["question_id"] for s in report["skipped"]] == ["random/2"]
    assert report["counts"]["questions"] == 4 and report["scores"]["accuracy"] == 100.0
    assert "skipped: 1 question" in (tmp_path / "b" / "report.md").read_text()
    # MMBench: a row with one option and a row whose image is not an image; each takes its
    # rotations with it, so no circular score is computed over part of a question.
    bad_image = mmbench_row(3, image=base64.b64encode(b"not an image").decode("ascii"))
    one_option = mmbench_row(
        2, answer="A", **{"B": float("nan"), "C": float("nan")}, d=float("nan")
    )
    rows = [mmbench_row(1), one_option, bad_image]
    questions = load_mmbench(mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows))
    kept, skipped = screen_questions(questions, "mmbench X", multiple_choice=True, skip=True)
    assert {q.group for q in kept} == {"1"} and len(kept) == 4
    problems = {s["question_id"]: s["problem"] for s in skipped}
    assert "1 option(s)" in problems["2"] and "does not decode" in problems["3"]
    assert len(skipped) == 1 + 4  # row 2 has one rotation, row 3 four


def test_mme_acc_plus_needs_both_questions_of_an_image(mme_folder):
    questions = [q for q in load_mme(mme_folder) if q.meta["category"] == "existence"]
    answers = {q.question_id: q.reference.capitalize() + "." for q in questions}
    answers["existence/0002.png/1"] = "Yes"  # reference no: one of image 0002's two questions wrong
    subtask = score("mme", questions, answers)["breakdown"]["by subtask"]["existence"]
    assert subtask["acc"] == pytest.approx(75.0)  # 3 of 4 questions
    assert subtask["acc+"] == pytest.approx(50.0)  # 1 of 2 images
    assert subtask["score"] == pytest.approx(125.0)


def test_mme_sums_perception_and_cognition(mme_folder):
    questions = load_mme(mme_folder)
    answers = {q.question_id: "是的" if q.reference == "yes" else "不是" for q in questions}
    scores = score("mme", questions, answers)["scores"]
    assert scores["perception"] == pytest.approx(400.0)  # existence + artwork, 200 each
    assert scores["cognition"] == pytest.approx(200.0)
    assert scores["total"] == pytest.approx(600.0)


def mmbench_tsv(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def mmbench_row(index, answer="B", hint=None, d="green", **extra) -> dict:
    image = base64.b64encode(png_bytes()).decode("ascii")
    return {"index": index, "question": "What colour is the shape?", "hint": hint, "A": "red",
            "B": "blue", "C": "yellow", "D": d, "answer": answer, "category": "attribute_recognition",
            "source": "fixture", "l2-category": "finegrained_perception (instance-level)",
            "image": image, **extra}  # fmt: skip


def test_mmbench_loader_adds_rotations_and_rotates_the_answer(tmp_path):
    rows = [mmbench_row(1, hint="A picture."), mmbench_row(2, answer="C", d=float("nan"))]
    questions = load_mmbench(mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows))
    assert len(questions) == 4 + 3  # four options, then three (D empty)
    by_id = {q.question_id: q for q in questions}
    assert by_id["1"].contents[0] == (
        "<image>\nA picture.\nWhat colour is the shape?\nA. red\nB. blue\nC. yellow\nD. green\n"
        + CHOICE_INSTRUCTION["en"]
    )
    assert by_id["1000001"].options == {"A": "blue", "B": "yellow", "C": "green", "D": "red"}
    assert [by_id[f"{k}000001" if k else "1"].reference for k in range(4)] == ["B", "A", "D", "C"]
    assert [by_id[i].reference for i in ("2", "1000002", "2000002")] == ["C", "B", "A"]
    assert {q.group for q in questions} == {"1", "2"}
    assert isinstance(by_id["2"].images[0], bytes)


def test_mmbench_file_with_rotations_and_shared_images(tmp_path):
    """VLMEvalKit's TSVs hold the rotations; a rotated row's image may name the original row."""
    rotated = mmbench_row(1000001, answer="A", image="1")
    rotated.update(A="blue", B="yellow", C="green", D="red")
    questions = load_mmbench(
        mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [mmbench_row(1), rotated])
    )
    assert [q.question_id for q in questions] == ["1", "1000001"]
    assert questions[1].images[0] == questions[0].images[0]


def test_mmbench_circular_three_of_four_rotations_right_scores_zero(tmp_path):
    questions = load_mmbench(mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [mmbench_row(1)]))
    answers = {q.question_id: f"The answer is {q.reference}." for q in questions}
    wrong = next(letter for letter in "ABCD" if letter != questions[3].reference)
    answers[questions[3].question_id] = wrong
    report = score("mmbench", questions, answers)
    assert report["scores"]["circular_accuracy"] == 0.0
    assert report["scores"]["single_pass_accuracy"] == 100.0  # the unrotated question was right
    assert report["breakdown"]["by category"]["attribute_recognition"]["circular_accuracy"] == 0.0
    answers[questions[3].question_id] = questions[3].options[questions[3].reference]  # its text
    report = score("mmbench", questions, answers)
    assert report["scores"]["circular_accuracy"] == 100.0
    assert report["breakdown"]["by l2-category"] == {
        "finegrained_perception (instance-level)": {"circular_accuracy": 100.0, "questions": 1}
    }


def test_mmbench_cn_gets_the_chinese_instruction(tmp_path):
    row = mmbench_row(1)
    row.update(question="图中形状是什么颜色？", A="红色", B="蓝色", C="黄色", D="绿色")
    questions = load_mmbench(mmbench_tsv(tmp_path / "MMBench_DEV_CN.tsv", [row]), rotate=False)
    assert len(questions) == 1
    assert questions[0].contents[0].endswith("D. 绿色\n请直接回答选项字母。")
    assert score("mmbench", questions, {"1": "答案是蓝色"})["scores"]["circular_accuracy"] == 100.0


@pytest.fixture
def scienceqa_folder(tmp_path) -> Path:
    problems = {
        "10": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1,
               "hint": "", "image": "image.png", "subject": "natural science", "grade": "grade4"},
        "11": {"question": "Which word is a noun?", "choices": ["run", "dog", "blue"], "answer": 1,
               "hint": "Read the words.", "image": "image.png", "subject": "language science",
               "grade": "grade8"},
        "12": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "",
               "image": None, "subject": "social science", "grade": "grade2"},
        "13": {"question": "Train question", "choices": ["a", "b"], "answer": 0, "hint": "",
               "image": "image.png", "subject": "social science", "grade": "grade2"},
    }  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems), encoding="utf-8")
    splits = {"train": ["13"], "val": [], "test": ["10", "11", "12"]}
    (tmp_path / "pid_splits.json").write_text(json.dumps(splits), encoding="utf-8")
    for pid in ("10", "11"):
        write_image(tmp_path / "test" / pid / "image.png")
    return tmp_path


def test_scienceqa_img_loader_and_breakdowns(scienceqa_folder):
    questions = load_scienceqa(scienceqa_folder, None)
    assert [q.question_id for q in questions] == ["10", "11"]  # no image, or not test: skipped
    assert questions[1].contents[0] == (
        "<image>\nContext: Read the words.\nWhich word is a noun?\nA. run\nB. dog\nC. blue\n"
        + CHOICE_INSTRUCTION["en"]
    )
    report = score("scienceqa", questions, {"10": "B", "11": "(A)"})
    assert report["scores"]["accuracy"] == 50.0
    assert report["breakdown"]["by subject"]["NAT"]["accuracy"] == 100.0
    assert report["breakdown"]["by subject"]["LAN"]["accuracy"] == 0.0
    assert report["breakdown"]["by context"]["TXT"] == {"accuracy": 0.0, "questions": 1}
    assert report["breakdown"]["by grade"]["G1-6"]["accuracy"] == 100.0


def test_textvqa_loader_and_answers_that_differ_only_by_normalisation(tmp_path):
    data = {"dataset_name": "textvqa", "data": [
        {"question": "what brand is it?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["coca-cola"] * 6 + ["coca cola"] * 2 + ["coke"] * 2},
        {"question": "how many dogs?", "image_id": "00c359f294f7dcd9", "question_id": 34603,
         "answers": ["2"] * 9 + ["two dogs"]},
    ]}  # fmt: skip
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data), encoding="utf-8")
    for image_id in ("003a8ae2ef43b901", "00c359f294f7dcd9"):
        write_image(tmp_path / "train_images" / f"{image_id}.jpg")
    questions = load_textvqa(tmp_path / "TextVQA_0.5.1_val.json", None)
    assert questions[0].contents[0] == (
        "<image>\nwhat brand is it?\nAnswer the question using a single word or phrase."
    )
    assert normalise_vqa_answer("The Coca-Cola!") == "coca cola"
    assert normalise_vqa_answer("Two.") == "2" and normalise_vqa_answer("dont") == "don't"
    # "coca-cola" and "coca cola" normalise alike: 8 of 10 humans -> 1.0; "Two" -> 9 of 10 -> 1.0
    report = score("textvqa", questions, {"34602": "Coca Cola.", "34603": "Two"})
    assert report["scores"]["vqa_accuracy"] == pytest.approx(100.0)
    # 2 of 10 humans said "coke": each leave-one-out has 1 or 2 matches -> (8 * 2/3 + 2 * 1/3) / 10
    assert vqa_accuracy("coke", data["data"][0]["answers"]) == pytest.approx(0.6)


def test_records_loader_asks_the_last_turn_with_its_history(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    records = [{"id": "r1", "image": "images/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "circle"}]}]  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(records), encoding="utf-8")
    (question,) = load_records(tmp_path / "test.json", None)
    assert question.roles == ("user", "assistant", "user")
    assert question.contents[-1] == "What shape?" and question.reference == "circle"
    report = score("records", [question], {"r1": "Circle."})
    assert report["scores"]["exact_match"] == 100.0
    assert report["breakdown"]["by questions asked"] == {
        "2": {"exact_match": 100.0, "questions": 1}
    }


def test_limit_keeps_whole_groups(mme_folder):
    questions = limit_groups(load_mme(mme_folder), 2)
    assert len(questions) == 4 and len({q.group for q in questions}) == 2


# --- reading free-text answers ----------------------------------------------------------------

OPTIONS = {"A": "red", "B": "blue", "C": "dark green", "D": "green"}
CHOICES = [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) blue", "B"), ("B: blue", "B"), ("[C]", "C"),
    ("b", None), ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (C)", "C"),
    ("The correct option is D.", "D"), ("I choose option B", "B"), ("Option D", "D"),
    ("答案是B", "B"), ("答案：Ｃ", "C"), ("选B", "B"), ("我选择D。", "D"), ("正确答案为（A）", "A"),
    ("应该选C", "C"), ("答案应该是 D", "D"), ("blue", "B"), ("It is dark green.", "C"),
    ("green", "D"), ("I think C is right", "C"), ("It's C", "C"), ("Both A and B", None),
    ("A cat", None), ("", None), ("None of them", None), ("**B**", "B"), ("E", None),
    ("The answer is not clear", None), ("蓝色", None), ("A", "A"),
]  # fmt: skip
YES_NO = [
    ("Yes", "yes"), ("Yes,", "yes"), ("yes.", "yes"), ("No.", "no"), ("No, there is not.", "no"),
    ("Yes, there is a dog in the image.", "yes"), ("There is no dog.", "no"),
    ("I don't see a dog.", "no"), ("There is a dog.", None), ("Sure", None), ("是的", "yes"),
    ("是", "yes"), ("不是", "no"), ("不", "no"), ("没有", "no"), ("有", "yes"), ("对", "yes"),
    ("否", "no"), ("图中有一只狗", "yes"), ("图中没有狗", "no"), ("", None), ("Yes and no", "yes"),
    ("maybe yes maybe no", None), ("Correct.", "yes"), ("Not at all", "no"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), CHOICES)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


@pytest.mark.parametrize(("text", "expected"), YES_NO)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


def test_the_extraction_table_is_large():
    assert len(CHOICES) + len(YES_NO) >= 30


def test_chinese_option_text_is_matched():
    assert extract_choice("是蓝色的", {"A": "红色", "B": "蓝色"}) == "B"


# --- the command line without a model -------------------------------------------------------


def test_an_answers_file_is_scored_without_a_model_and_runs_compare(pope_files, tmp_path, capsys):
    coco, images = pope_files
    answers = tmp_path / "theirs.jsonl"
    rows = [{"question_id": f"random/{i}", "answer": "yes" if i < 4 else "no"} for i in range(1, 6)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--benchmark", "pope", "--data", str(coco / "coco_pope_random.json"),
              "--image_folder", str(images)]  # fmt: skip
    report = cli.main([*common, "--answers", str(answers), "--output_dir", str(tmp_path / "a")])
    assert report["scores"]["accuracy"] == 100.0 and report["counts"]["missing"] == 0
    assert (tmp_path / "a" / "report.md").read_text().startswith("# pope evaluation")
    rows[0]["answer"] = "no"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]), encoding="utf-8")
    report = cli.main([*common, "--answers", str(answers), "--output_dir", str(tmp_path / "b")])
    assert report["counts"]["missing"] == 1 and report["scores"]["accuracy"] == 60.0
    table = cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| benchmark | metric | a | b |" in table
    assert "| pope | accuracy | 100.00 | 60.00 |" in table
    assert "| pope | accuracy | 100.00 | 60.00 |" in capsys.readouterr().out


def test_a_different_run_in_the_same_directory_is_refused(pope_files, tmp_path):
    coco, images = pope_files
    answers = tmp_path / "theirs.jsonl"
    answers.write_text(json.dumps({"question_id": "random/1", "text": "yes"}) + "\n")
    out = str(tmp_path / "out")
    args = ["--benchmark", "pope", "--data", str(coco), "--image_folder", str(images),
            "--answers", str(answers), "--output_dir", out]  # fmt: skip
    cli.main(args)
    with pytest.raises(ValueError, match="another run .*max_new_tokens|generation"):
        cli.main([*args, "--max_new_tokens", "3"])
    cli.main([*args, "--max_new_tokens", "3", "--overwrite"])


def test_user_mistakes_name_the_flag(tmp_path, mme_folder):
    out = ["--output_dir", str(tmp_path / "out"), "--answers", str(tmp_path / "none.jsonl")]
    with pytest.raises(FileNotFoundError, match="--data"):
        cli.main(["--benchmark", "mme", "--data", str(tmp_path / "missing"), *out])
    with pytest.raises(FileNotFoundError, match="--answers"):
        cli.main(["--benchmark", "mme", "--data", str(mme_folder), *out])
    assert not (tmp_path / "out").exists()  # nothing written for a refused command
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="subtask folders"):
        cli.main(["--benchmark", "mme", "--data", str(tmp_path / "empty"), *out])
    with pytest.raises(SystemExit):  # argparse: one of --model_weights / --answers
        cli.main(["--benchmark", "mme", "--data", str(mme_folder), "--output_dir", str(tmp_path)])


def test_a_half_written_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": "1", "answer": "yes"}\n{"question_id": "2", "ans')
    assert read_answers(path, repair=True) == {"1": "yes"}
    assert path.read_text() == '{"question_id": "1", "answer": "yes"}\n'


# --- answering with a tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_clip_dir):
    """A tiny random VLM with the demo's LLM init (logits with a realistic range, so greedy
    choices are not decided by rounding)."""
    import torch

    from demo.tiny_models import DEMO_QWEN, save_tiny_qwen
    from model.builder import build_vlm
    from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig
    from runtime.inference import GenerationSettings, InferenceSession

    qwen_dir = save_tiny_qwen(tmp_path_factory.mktemp("demo-qwen"), **DEMO_QWEN)
    language = LanguageModelConfig(language_model=str(qwen_dir), dtype="float32")
    torch.manual_seed(0)
    vlm, tokenizer = build_vlm(
        language, VisionConfig(vision_model=str(tiny_clip_dir)), ProjectorConfig()
    )
    vlm.eval()
    return InferenceSession(vlm, tokenizer, settings=GenerationSettings(max_new_tokens=6))


@pytest.mark.slow
def test_batched_answers_equal_one_at_a_time_answers(session, tmp_path):
    images = [write_image(tmp_path / f"{i}.png", colour) for i, colour in
              enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)])]  # fmt: skip
    conversations = [
        (("user",), ("<image>\nWhat colour?",)),
        (("user",), ("<image>\nDescribe the shape in this picture, its colour and where it is.",)),
        (
            ("user", "assistant", "user"),
            ("<image>\nWhat is it?", "A circle.", "<image>\nAnd here?"),
        ),
        (("user",), ("Say something without an image, please.",)),
    ]
    pictures = [[images[0]], [images[1]], [images[2], images[0]], []]
    batched = session.answer_batch(conversations, pictures)
    singles = [
        session.answer(roles, contents, p)
        for (roles, contents), p in zip(conversations, pictures, strict=True)
    ]
    assert batched == singles
    assert len({len(session.prompt_ids(*c)) for c in conversations}) == 4  # mixed lengths
    assert any(answer for answer in batched)


class Killed(Exception):
    """Stands for the process being killed in the middle of generation."""


def _interrupting(generate, calls_before_kill: int):
    """`generate` that raises after `calls_before_kill` calls, and the batch sizes it served."""
    calls = []

    def dying_generate(*args, **kwargs):
        if len(calls) == calls_before_kill:
            raise Killed
        calls.append(args[0].shape[0])
        return generate(*args, **kwargs)

    return dying_generate, calls


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_report(
    session, pope_files, tmp_path, monkeypatch
):
    coco, images = pope_files
    common = ["--benchmark", "pope", "--data", str(coco), "--image_folder", str(images),
              "--model_weights", str(tmp_path / "unused"), "--batch_size", "2",
              "--max_new_tokens", "4", "--no_progress"]  # fmt: skip
    whole = cli.evaluate(
        cli.parse_args([*common, "--output_dir", str(tmp_path / "whole")]), session
    )
    resumed = tmp_path / "resumed"
    args = cli.parse_args([*common, "--output_dir", str(resumed)])
    generate = session.vlm.generate
    dying, calls = _interrupting(generate, calls_before_kill=2)
    monkeypatch.setattr(session.vlm, "generate", dying)
    with pytest.raises(Killed):
        cli.evaluate(args, session)
    assert len(read_answers(resumed / "answers.jsonl")) == 4  # two batches of two made it
    assert not (resumed / "report.json").exists()
    dying, calls = _interrupting(generate, calls_before_kill=99)
    monkeypatch.setattr(session.vlm, "generate", dying)
    report = cli.evaluate(args, session)
    assert calls == [2, 1]  # only the 3 unanswered of 7 questions were asked again
    for key in ("scores", "breakdown", "counts"):
        assert report[key] == whole[key]
    assert read_answers(resumed / "answers.jsonl") == read_answers(
        tmp_path / "whole" / "answers.jsonl"
    )


@pytest.mark.slow
def test_throughput_benchmark_generates_what_llava_generates(tmp_path):
    from bench import eval_throughput

    out = tmp_path / "rows.json"
    argv = [
        "--questions",
        "3",
        "--batch_sizes",
        "1",
        "3",
        "--max_new_tokens",
        "3",
        "--out",
        str(out),
    ]
    rows = eval_throughput.main(argv)
    assert [row["batch_size"] for row in rows] == [1, 3]
    assert all(row["same_tokens"] for row in rows)  # equal weights, greedy: equal tokens
    assert json.loads(out.read_text()) == rows


def test_throughput_benchmark_at_a_preset_times_the_first_token(tmp_path):
    from bench import eval_throughput

    argv = "--scale tiny --questions 2 --batch_sizes 2 --max_new_tokens 2 --no-answer_batch"
    (row,) = eval_throughput.main(argv.split())
    assert row["same_tokens"]  # the preset's random weights in both, greedy
    assert row["ours_first_token_s"] > 0 and row["reference_first_token_s"] > 0
    assert row["answer_batch_questions_per_s"] is None
