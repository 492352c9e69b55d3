"""The one inference path: multi-turn prompts keep their history, laid out as training lays it
out; test.py's chat and evaluation answer the right turn; bad prompts are refused early."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint

from dataset.conversation import IGNORE_INDEX, encode_conversation, encode_prompt
from qwen import QWenTokenizer
from runtime.inference import GenerationSettings, InferenceSession

_spec = importlib.util.spec_from_file_location(
    "prompt_test", Path(__file__).resolve().parent.parent / "test.py"
)
prompt_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prompt_test)

IMAGE_ID, N = 151646, 4
TURNS = [
    ("user", "<image>\nWhat color is the shape?"),
    ("assistant", "red"),
    ("user", "What shape is in the image?"),
    ("assistant", "circle"),
    ("user", "Where is the shape?"),
    ("assistant", "top left"),
]


def answer_starts(labels: list[int]) -> list[int]:
    """Index of the first token of every supervised run (each assistant answer)."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (
        i == 0 or labels[i - 1] == IGNORE_INDEX)]  # fmt: skip


@pytest.mark.parametrize("system", ["You are a helpful assistant.", "Answer briefly."])
def test_prompt_for_turn_k_is_the_training_rendering_of_its_history(system):
    tokenizer = QWenTokenizer()
    roles, contents = zip(*TURNS, strict=True)
    full = encode_conversation(
        tokenizer, roles, contents, image_token_id=IMAGE_ID, num_image_tokens=N,
        system_prompt=system,
    )  # fmt: skip
    starts = answer_starts(full.labels)
    assert len(starts) == 3
    for k, start in enumerate(starts):
        turns = 2 * k + 1  # history of k pairs plus user turn k+1
        prompt = encode_prompt(
            tokenizer, roles[:turns], contents[:turns], image_token_id=IMAGE_ID,
            num_image_tokens=N, system_prompt=system,
        )  # fmt: skip
        assert prompt == full.input_ids[:start]
    # The last prompt holds every earlier answer and ends with the last question.
    text = tokenizer.decode(prompt)
    assert "red" in text and "circle" in text
    assert text.endswith("Where is the shape?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir):
    out = tmp_path_factory.mktemp("ckpt")
    return save_tiny_checkpoint(out, tiny_qwen_dir, tiny_clip_dir, system_prompt="Be brief.")


class PromptRecorder:
    """Wraps `vlm.generate` and keeps the decoded prompt of every call."""

    def __init__(self, session: InferenceSession) -> None:
        self.prompts: list[str] = []
        generate = session.vlm.generate

        def recording_generate(input_ids, **kwargs):
            self.prompts.append(session.tokenizer.decode(input_ids[0].tolist()))
            return generate(input_ids, **kwargs)

        session.vlm.generate = recording_generate


def recorded_session(monkeypatch) -> list[PromptRecorder]:
    recorders: list[PromptRecorder] = []
    load = InferenceSession.from_checkpoint.__func__

    def from_checkpoint(cls, *args, **kwargs):
        session = load(cls, *args, **kwargs)
        recorders.append(PromptRecorder(session))
        return session

    monkeypatch.setattr(InferenceSession, "from_checkpoint", classmethod(from_checkpoint))
    return recorders


def test_chat_answers_every_follow_up_with_the_whole_history(
    checkpoint, shapes_dir, monkeypatch, capsys
):
    recorders = recorded_session(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Which shape?\n这个形状在哪里？\n"))
    image = sorted((shapes_dir / "images").iterdir())[0]
    prompt_test.main(
        ["--model_weights", str(checkpoint), "--image_path", str(image),
         "--prompt", "What color is the shape?", "--chat", "--max_new_tokens", "3"]
    )  # fmt: skip
    replies = capsys.readouterr().out.strip().split("\n")
    prompts = recorders[0].prompts
    assert len(prompts) == 3
    first_reply = replies[0].split("\t", 1)[1]
    assert prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the recorded one
    assert prompts[1].endswith("Which shape?<|im_end|>\n<|im_start|>assistant\n")
    assert f"<|im_start|>assistant\n{first_reply}<|im_end|>" in prompts[1]
    assert prompts[2].endswith("这个形状在哪里？<|im_end|>\n<|im_start|>assistant\n")
    assert "Which shape?" in prompts[2] and prompts[2].startswith(prompts[1])


def test_chat_skips_blank_lines_and_keeps_going_after_an_image_marker(
    checkpoint, shapes_dir, monkeypatch, caplog
):
    recorders = recorded_session(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \nAnd <image> this?\nWhich shape?\n"))
    image = sorted((shapes_dir / "images").iterdir())[0]
    prompt_test.main(
        ["--model_weights", str(checkpoint), "--image_path", str(image), "--chat",
         "--max_new_tokens", "3"]
    )  # fmt: skip
    prompts = recorders[0].prompts
    assert len(prompts) == 2 and prompts[1].endswith(
        "Which shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_start|>user\n<|im_end|>" not in prompts[1]  # no empty turn
    assert "not sent: <image> in a follow-up; images are given with --image_path" in caplog.text


def test_evaluation_asks_each_records_last_question(checkpoint, shapes_dir, tmp_path, monkeypatch):
    recorders = recorded_session(monkeypatch)
    image = sorted((shapes_dir / "images").iterdir())[0].relative_to(shapes_dir).as_posix()
    conversations = [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in TURNS]
    records = [
        {"id": "one_turn", "image": image, "conversations": conversations[:2]},
        {"id": "three_turns", "image": image, "conversations": conversations},
    ]
    data = tmp_path / "multi.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    report = prompt_test.main(
        ["--model_weights", str(checkpoint), "--data_path", str(data),
         "--image_folder", str(shapes_dir), "--max_new_tokens", "2", "--batch_size", "1"]
    )  # fmt: skip
    assert [a["reference"] for a in report["answers"]] == ["red", "top left"]
    first, last = recorders[0].prompts
    assert first.endswith("What color is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert last.endswith("Where is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nred<|im_end|>" in last
    assert "<|im_start|>assistant\ncircle<|im_end|>" in last


def test_test_py_and_the_records_benchmark_give_one_score(checkpoint, shapes_dir, tmp_path):
    """`test.py --data_path` answers and scores through `runtime.evaluation`'s records path: the
    same answers, the same exact match overall and by questions asked, for a set where half of
    the references are the model's own answers (so the score is neither 0 nor 100)."""
    from runtime.evaluation.cli import main as evaluation_main

    flags = ["--image_folder", str(shapes_dir), "--max_new_tokens", "3"]
    model = ["--model_weights", str(checkpoint)]
    first = prompt_test.main([*model, "--data_path", str(shapes_dir / "test.json"), *flags])
    said = {answer["id"]: answer["prediction"] for answer in first["answers"]}
    records = json.loads((shapes_dir / "test.json").read_text(encoding="utf-8"))
    for record in records[::2]:
        record["conversations"][-1]["value"] = said[record["id"]]
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(records), encoding="utf-8")

    ours = prompt_test.main([*model, "--data_path", str(data), *flags])
    out = tmp_path / "eval"
    theirs = evaluation_main(["--benchmark", "records", "--data", str(data), *model,
                              "--output_dir", str(out), "--no_progress", *flags])  # fmt: skip
    assert 0 < ours["exact_match"] < 1
    assert theirs["scores"]["exact_match"] == pytest.approx(100 * ours["exact_match"])
    by_turns = theirs["breakdown"]["by questions asked"]
    assert {n: row["exact_match"] / 100 for n, row in by_turns.items()} == pytest.approx(
        ours["exact_match_by_turns"]
    )
    rows = (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    answers = {row["question_id"]: row["answer"] for row in map(json.loads, rows)}
    assert answers == {answer["id"]: answer["prediction"] for answer in ours["answers"]}


def test_records_whose_image_is_missing_or_corrupt_stop_or_are_skipped(
    checkpoint, shapes_dir, tmp_path
):
    image = sorted((shapes_dir / "images").iterdir())[0]
    (tmp_path / "good.png").write_bytes(image.read_bytes())
    (tmp_path / "corrupt.png").write_bytes(image.read_bytes()[:40])
    records = [
        {"id": name, "image": file, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": "red"}]}
        for name, file in [("good", "good.png"), ("gone", "gone.png"), ("bad", "corrupt.png")]
    ]  # fmt: skip
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    argv = ["--model_weights", str(checkpoint), "--data_path", str(data), "--max_new_tokens", "2"]
    with pytest.raises(ValueError, match="gone.png.*pass --skip_bad_images"):
        prompt_test.main(argv)  # images under the data file's folder by default
    report = prompt_test.main([*argv, "--skip_bad_images"])
    assert [a["id"] for a in report["answers"]] == ["good"]
    assert [s["id"] for s in report["skipped"]] == ["gone", "bad"]


def test_answers_are_the_same_through_the_session_and_by_hand(checkpoint, shapes_dir):
    session = InferenceSession.from_checkpoint(
        checkpoint, dtype="float32", settings=GenerationSettings(max_new_tokens=5)
    )
    image = sorted((shapes_dir / "images").iterdir())[0]
    roles, contents = ["user"], ["<image>\nWhat color is the shape?"]
    reply = session.answer(roles, contents, [image])
    ids = torch.tensor([session.prompt_ids(roles, contents)])
    pixels = session.vlm.vision.preprocess([prompt_test_image(image)])
    new = session.vlm.generate(
        ids, pixel_values=pixels, **session.settings.generate_kwargs(session.tokenizer)
    )
    assert reply == session.tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()


def prompt_test_image(path):
    from visual import load_image

    return load_image(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "<image>\nWhat is it?"], "--prompt contains <image> but no --image_path"),
        (["--system_prompt", "Look at <image>"], "--system_prompt must not contain '<image>'"),
        (["--system_prompt", "x<|im_start|>user"], "--system_prompt must not contain"),
        (["--temperature", "0", "--do_sample"], "--temperature 0.0 is out of range"),
        (["--data_path", "missing.json"], "--data_path missing.json: no such file"),
    ],
)
def test_bad_prompt_flags_are_refused_before_loading(checkpoint, argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("?", r"\?")):
        prompt_test.main(["--model_weights", str(checkpoint), *argv])


def test_an_output_file_that_is_a_directory_is_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--output_file .*is a directory"):
        prompt_test.main(
            ["--model_weights", str(checkpoint), "--data_path", __file__,
             "--output_file", str(tmp_path)]
        )  # fmt: skip


def test_a_prompt_with_more_markers_than_images_is_refused(checkpoint, shapes_dir):
    session = InferenceSession.from_checkpoint(checkpoint, dtype="float32")
    image = sorted((shapes_dir / "images").iterdir())[0]
    with pytest.raises(ValueError, match="2 <image> marker"):
        session.answer(["user"], ["<image><image>\nCompare."], [image])


def test_stop_ids_for_qwen_and_for_an_hf_chatml_tokenizer():
    from dataset.conversation import chat_stop_token_ids
    from runtime.export.tokenizer import qwen_fast_tokenizer

    qwen = QWenTokenizer()
    assert chat_stop_token_ids(qwen) == [151645, 151644, 151643]
    fast = qwen_fast_tokenizer(qwen)  # an HF tokenizer whose eos is <|im_end|>
    fast.eos_token = "<|endoftext|>"
    assert chat_stop_token_ids(fast) == [151645, 151644, 151643]
    fast.eos_token = "<|im_end|>"
    assert chat_stop_token_ids(fast) == [151645, 151644]
