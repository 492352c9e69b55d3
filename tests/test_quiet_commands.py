"""Commands print no known noise of the model stack: bitsandbytes' "pip install kernels" hint
(which `import peft` triggered in every command, `--help` included) and transformers'
`is_gradient_checkpointing` FutureWarning (which peft triggered in every LoRA load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.builder import build_vlm
from model.checkpoint import describe, save_trainable
from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
from model.trainable import configure_trainable

REPO = Path(__file__).resolve().parent.parent
NOISE = ("pip install kernels", "is_gradient_checkpointing")


HELP_COMMANDS = ["train.py", "test.py", "-m runtime.web", "-m runtime.merge", "-m runtime.export",
                 "-m runtime.evaluation"]  # fmt: skip


def start(*command: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def stderr_of(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


@pytest.fixture(scope="module")
def help_stderr() -> dict[str, str]:
    """Every command's `--help`, started together: each is ~6 s of single-threaded imports."""
    running = {command: start(*command.split(), "--help") for command in HELP_COMMANDS}
    return {command: stderr_of(process) for command, process in running.items()}


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_prints_no_noise(help_stderr, command):
    said = help_stderr[command]
    assert not [noise for noise in NOISE if noise in said], said


@pytest.mark.slow
def test_loading_a_lora_checkpoint_prints_no_noise(tmp_path, tiny_qwen_dir, tiny_clip_dir):
    language = LanguageModelConfig(language_model=str(tiny_qwen_dir), dtype="float32")
    vision = VisionConfig(vision_model=str(tiny_clip_dir))
    torch.manual_seed(0)
    vlm, tokenizer = build_vlm(language, vision, ProjectorConfig())
    configure_trainable(vlm, LoraSettings(lora_rank=4))
    save_trainable(
        vlm,
        tokenizer,
        tmp_path,
        describe(vlm, language, vision, ProjectorConfig(), system_prompt="s"),
    )
    said = stderr_of(start("test.py", "--model_weights", str(tmp_path), "--prompt", "Hello",
                           "--max_new_tokens", "2", "--dtype", "float32"))  # fmt: skip
    assert not [noise for noise in NOISE if noise in said], said
