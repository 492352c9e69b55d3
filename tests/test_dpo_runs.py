"""DPO runs as SFT runs do: a kill -9 + resume is exact (on top of an SFT parent, so the
reference projector must come back as the parent's), and two DDP processes match one with the
same global batch, rewards included. Slow: each trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_flags
from test_dpo import write_pairs
from test_training_runs import CHECKPOINT_FILES, final_weights

import train
from runtime import engines

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
COMMON = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "seed": 7}
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def logged(out: Path, step: int) -> list[dict]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_dpo_resume_after_a_kill_matches_an_uninterrupted_run(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    sft = tmp_path / "sft"
    train.main(train_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir / "train.json", shapes_dir,
                           sft, max_steps=1, per_device_train_batch_size=2, **COMMON))  # fmt: skip
    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=24)

    def flags(out, **extra):
        return train_flags(
            "ignored", "ignored", pairs, shapes_dir, out, training_objective="dpo",
            init_from=sft, max_steps=6, save_steps=2, per_device_train_batch_size=2,
            learning_rate=5e-3, feature_proj_lr=5e-3, rpo_alpha=0.5, **COMMON, **extra,
        )  # fmt: skip

    reference = tmp_path / "reference"
    train.main(flags(reference))
    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO / "train.py"), *flags(killed)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (killed / "checkpoint-2").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint-2 after 180 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    for checkpoint in killed.glob("checkpoint-*"):
        assert all((checkpoint / name).is_file() for name in CHECKPOINT_FILES), checkpoint

    resumed = train.main(flags(killed, resume_from_checkpoint="latest"))
    assert resumed.state.global_step == 6
    expected, got = final_weights(reference), final_weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    want, have = logged(reference, 6), logged(killed, 6)
    for key in ("loss", *REWARDS):  # the reference came back: the rewards are the same
        assert [e[key] for e in have][-2:] == pytest.approx([e[key] for e in want][-2:], rel=1e-5)
    assert want[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # it trained


def test_two_processes_match_one_with_the_same_global_batch(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=12)

    def flags(out, batch):
        return train_flags(
            tiny_qwen_dir, tiny_clip_dir, pairs, shapes_dir, out, training_objective="dpo",
            per_device_train_batch_size=batch, max_steps=3, save_steps=3, learning_rate=1e-2,
            feature_proj_lr=1e-2, **COMMON,
        )  # fmt: skip

    single = tmp_path / "single"
    train.main(flags(single, batch=4))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "train.py"), *flags(double, batch=2)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = logged(single, 3), logged(double, 3)
    assert len(got) == 3 and (double / "checkpoint-3" / "rng_state_1.pth").is_file()
    for key in ("loss", *REWARDS):  # rewards averaged over both ranks' pairs
        assert [e[key] for e in got] == pytest.approx(
            [e[key] for e in expected], rel=1e-4, abs=1e-6
        ), key
    assert expected[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)


def write_mixed_pairs(shapes_dir: Path, out: Path) -> Path:
    """[image pair, 3 text-only pairs]: every step of a 2-process run has a rank without an image
    (the tower and projector must still run there in the same order: the image-path probe)."""
    records = json.loads(write_pairs(shapes_dir, out, count=1).read_text(encoding="utf-8"))
    for index, (question, yes) in enumerate(
        [("Is the sky blue?", True), ("Is fire cold?", False), ("Is snow white?", True)]
    ):
        answers = ("yes", "no") if yes else ("no", "yes")
        records.append({"id": f"text{index}", "conversations": [{"from": "human", "value": question}],
                        "chosen": answers[0], "rejected": answers[1]})  # fmt: skip
    out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.mark.skipif(not engines.deepspeed_installed(), reason="SKIPPED: deepspeed is not installed")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_one(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path, stage
):
    pairs = write_mixed_pairs(shapes_dir, tmp_path / "pairs.json")
    config = REPO / "configs" / "deepspeed" / f"{stage}.json"

    def flags(out, batch, **extra):
        return train_flags(
            tiny_qwen_dir, tiny_clip_dir, pairs, shapes_dir, out, training_objective="dpo",
            per_device_train_batch_size=batch, max_steps=3, save_steps=3, learning_rate=1e-2,
            feature_proj_lr=1e-2, **COMMON, **extra,
        )  # fmt: skip

    single = tmp_path / "single"
    train.main(flags(single, batch=2))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "train.py"), *flags(double, batch=1, deepspeed=config)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = logged(single, 3), logged(double, 3)
    assert (double / "checkpoint-3" / "rng_state_1.pth").is_file()
    for key in ("loss", *REWARDS):
        assert [e[key] for e in got] == pytest.approx(
            [e[key] for e in expected], rel=1e-4, abs=1e-6
        ), key
    assert len({e["loss"] for e in expected}) > 1


def test_qlora_dpo_trains_with_the_4_bit_llm_as_its_own_reference(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=2)
    out = tmp_path / "qlora"
    trainer = train.main(
        train_flags(
            tiny_qwen_dir,
            tiny_clip_dir,
            pairs,
            shapes_dir,
            out,
            training_objective="dpo",
            bits=4,
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            **COMMON,
        )  # fmt: skip
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA off = LoRA at its start
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
