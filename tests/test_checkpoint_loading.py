"""Loading and merging checkpoints: damaged files, other base weights, a busy destination and the
splice rule are refused with one clear message; an interrupted merge leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint, truncate
from transformers import Qwen2Config, Qwen2ForCausalLM

from demo.tiny_models import save_tiny_qwen
from model.checkpoint import CheckpointError, load_vlm
from model.projector import build_projector
from model.vlm import VisionLanguageModel
from runtime import merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_qwen_dir, tiny_clip_dir)


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


@pytest.mark.parametrize("name", ["projector.safetensors", "adapter/adapter_model.safetensors"])
def test_a_damaged_weight_file_is_named(checkpoint, tmp_path, name):
    damaged = copy_of(checkpoint, tmp_path)
    truncate(damaged / name)
    with pytest.raises(CheckpointError, match=f"{damaged / name}: damaged"):
        load_vlm(damaged, dtype="float32")


def test_a_missing_projector_file_is_named(checkpoint, tmp_path):
    damaged = copy_of(checkpoint, tmp_path)
    (damaged / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="projector.safetensors: missing"):
        load_vlm(damaged, dtype="float32")


def test_a_damaged_description_is_named(checkpoint, tmp_path):
    damaged = copy_of(checkpoint, tmp_path)
    truncate(damaged / "vlm_config.json")
    with pytest.raises(CheckpointError, match="vlm_config.json: damaged"):
        load_vlm(damaged, dtype="float32")


def test_a_projector_of_another_width_is_named(checkpoint, tmp_path):
    from safetensors.torch import save_file

    other = copy_of(checkpoint, tmp_path)
    wrong = build_projector("mlp2x_gelu", 64, 48, 16).state_dict()  # Dl 48 instead of 64
    save_file({k: v.contiguous() for k, v in wrong.items()}, other / "projector.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model.*size mismatch"):
        load_vlm(other, dtype="float32")


@pytest.mark.slow
def test_other_base_weights_are_refused_unless_allowed(checkpoint, tmp_path, caplog):
    other_qwen = save_tiny_qwen(tmp_path / "other-qwen", seed=123)  # same shapes, other weights
    with pytest.raises(
        CheckpointError, match="trained on other language_model weights.*--allow_other_base"
    ):
        load_vlm(checkpoint, language_model=str(other_qwen), dtype="float32")
    vlm, _, _ = load_vlm(
        checkpoint, language_model=str(other_qwen), dtype="float32", allow_other_base=True
    )
    assert "TRAINED ON OTHER LANGUAGE_MODEL WEIGHTS" in caplog.text
    assert vlm.num_image_tokens == 16


def test_a_checkpoint_trained_with_relative_paths_loads_from_another_directory(
    tmp_path, tiny_qwen_dir, tiny_clip_dir
):
    out = save_tiny_checkpoint(tmp_path / "ckpt", tiny_qwen_dir, tiny_clip_dir, relative_to=ROOT)
    recorded = json.loads((out / "vlm_config.json").read_text())["language_model"]
    assert Path(recorded["language_model"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = Path.cwd()
    try:
        os.chdir(elsewhere)
        vlm, _, _ = load_vlm(out, dtype="float32")
    finally:
        os.chdir(cwd)
    assert vlm.image_token_id == 151646


def test_a_missing_base_model_names_the_flag(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="--language_model .*nowhere"):
        load_vlm(checkpoint, language_model=str(tmp_path / "nowhere"), dtype="float32")


def run_merge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "model.merge", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # two subprocesses
def test_merge_refuses_a_non_empty_destination_and_a_missing_source(checkpoint, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "projector.safetensors").write_text("a run's file")
    result = run_merge(str(checkpoint), str(busy))
    assert result.returncode == 2
    assert "is not empty" in result.stderr and "--overwrite" in result.stderr
    assert (busy / "projector.safetensors").read_text() == "a run's file"
    result = run_merge(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "no such checkpoint directory" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_overwrites_only_when_asked_and_writes_whole_or_nothing(
    checkpoint, tmp_path, monkeypatch
):
    out = tmp_path / "merged"
    merge.merge_checkpoint(checkpoint, out, dtype="float32")
    assert (out / "language_model" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="is not empty"):
        merge.merge_checkpoint(checkpoint, out, dtype="float32")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge, "save_projector_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        merge.merge_checkpoint(checkpoint, out, dtype="float32", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial directory
    assert (out / "projector.safetensors").is_file()  # the earlier merge is intact
    monkeypatch.undo()
    merge.merge_checkpoint(checkpoint, out, dtype="float32", overwrite=True)
    assert load_vlm(out, dtype="float32")[0].num_image_tokens == 16


def tiny_qwen2_vlm(tiny_clip_dir) -> VisionLanguageModel:
    from visual import load_vision_tower

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=32)
    )  # fmt: skip
    vision = load_vision_tower(str(tiny_clip_dir))
    projector = build_projector("mlp2x_gelu", vision.hidden_size, 32, vision.num_image_tokens)
    return VisionLanguageModel(vision, projector, llm, image_token_id=7)


@pytest.mark.parametrize("llm", ["qwen", "qwen2"])
def test_both_splice_paths_refuse_placeholders_and_features_that_disagree(
    llm, checkpoint, tiny_clip_dir
):
    vlm = (
        load_vlm(checkpoint, dtype="float32")[0] if llm == "qwen" else tiny_qwen2_vlm(tiny_clip_dir)
    )
    n = vlm.num_image_tokens
    placeholder = torch.tensor([[3] + [vlm.image_token_id] * n + [5]])  # [1, N + 2]
    text = torch.tensor([[3, 4, 5]])
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=f"contain {n} placeholder positions .* 0 image feature"):
        vlm(placeholder)
    with pytest.raises(ValueError, match=f"contain 0 placeholder positions .* {n} image feature"):
        vlm(text, pixel_values=pixels)
    assert vlm(placeholder, pixel_values=pixels).logits.shape[1] == n + 2
    assert vlm(text).logits.shape[1] == 3
