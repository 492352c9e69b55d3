"""train.py -> checkpoint -> test.py (prompts and evaluation), and bad input stopping early."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import train

# test.py shares its name with the standard library's `test` package: load it by path.
_spec = importlib.util.spec_from_file_location(
    "prompt_test", Path(__file__).resolve().parent.parent / "test.py"
)
prompt_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prompt_test)


def train_args(tiny_qwen_dir, tiny_clip_dir, shapes_dir, out_dir, data_path=None):
    return [
        "--config", "configs/demo.yaml",
        "--language_model", str(tiny_qwen_dir),
        "--vision_model", str(tiny_clip_dir),
        "--data_path", str(data_path or shapes_dir / "train.json"),
        "--image_folder", str(shapes_dir),
        "--output_dir", str(out_dir),
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--save_steps", "2",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip


SCHEDULE = ["--logging_steps", "1", "--warmup_steps", "1", "--lr_scheduler_type", "linear",
            "--learning_rate", "1e-3", "--feature_proj_lr", "1e-2"]  # fmt: skip


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir, shapes_dir):
    out = tmp_path_factory.mktemp("run")
    trainer = train.main(train_args(tiny_qwen_dir, tiny_clip_dir, shapes_dir, out) + SCHEDULE)
    return out, trainer


@pytest.fixture(scope="module")
def trained_dir(training_run):
    return training_run[0]


def test_projector_has_its_own_learning_rate_through_the_schedule(training_run):
    _, trainer = training_run
    for group in trainer.optimizer.param_groups:
        names = {
            n for n, p in trainer.model.named_parameters() if any(p is q for q in group["params"])
        }
        is_projector = group["group_name"] == "projector"
        assert names and all(n.startswith("projector.") == is_projector for n in names)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    llm = [entry["learning_rate"] for entry in logs]
    projector = [entry["learning_rate_projector"] for entry in logs]
    assert len(logs) == 3
    # Logged after each scheduler step: warmup to the peak in 1 step, then linear decay to 0.
    assert llm == pytest.approx([1e-3, 5e-4, 0.0])
    assert projector == pytest.approx([10 * rate for rate in llm])


def test_training_writes_small_checkpoints(trained_dir):
    checkpoint = trained_dir / "checkpoint-2"
    for directory in (trained_dir, checkpoint):
        names = {p.name for p in directory.iterdir()}
        assert {"vlm_config.json", "projector.safetensors", "adapter", "train_config.yaml"} <= names
        assert "model.safetensors" not in names  # no frozen weights
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }


def test_evaluation_mode_scores_and_writes_answers(trained_dir, shapes_dir, tmp_path, capsys):
    out_file = tmp_path / "answers.json"
    report = prompt_test.main(
        [
            "--model_weights", str(trained_dir),
            "--data_path", str(shapes_dir / "test.json"),
            "--image_folder", str(shapes_dir),
            "--output_file", str(out_file),
            "--max_new_tokens", "4",
        ]
    )  # fmt: skip
    written = json.loads(out_file.read_text(encoding="utf-8"))
    assert written["num_records"] == report["num_records"] == 8
    assert 0.0 <= written["exact_match"] <= 1.0
    assert {"id", "prediction", "reference", "correct"} <= set(written["answers"][0])
    assert "exact match:" in capsys.readouterr().out


def test_prompt_mode_answers_every_image_in_a_folder(trained_dir, shapes_dir, capsys):
    folder = shapes_dir / "images"
    images = sorted(folder.iterdir())[:3]
    picked = shapes_dir / "picked"
    picked.mkdir(exist_ok=True)
    for image in images:
        (picked / image.name).write_bytes(image.read_bytes())
    prompt_test.main(
        [
            "--model_weights", str(trained_dir),
            "--base_language_model", str(json.loads(
                (trained_dir / "vlm_config.json").read_text())["language_model"]["language_model"]),
            "--image_path", str(picked),
            "--prompt", "What colour is the shape?",
            "--max_new_tokens", "3",
        ]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert all("\t" in line for line in lines)


def test_bad_record_stops_before_training(tmp_path, tiny_qwen_dir, tiny_clip_dir, shapes_dir):
    records = json.loads((shapes_dir / "train.json").read_text(encoding="utf-8"))[:4]
    records[2]["image"] = "images/does-not-exist.png"
    records[3]["conversations"] = records[3]["conversations"][:1]  # no assistant turn
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        train.main(train_args(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path / "o", data))
    message = str(error.value)
    assert records[2]["id"] in message and records[3]["id"] in message
    assert not (tmp_path / "o" / "checkpoint-2").exists()
