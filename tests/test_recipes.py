"""Every shipped recipe parses into a valid RunConfig, and the recipes agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from model.config import TRAIN_MODES
from runtime import engines
from runtime.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def recipe(name: str):
    return load_config(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_valid(path):
    config = load_config(path)  # unknown keys and bad choices raise here
    assert config.lora.train_mode in TRAIN_MODES
    assert config.training.learning_rate > 0 and config.training.feature_proj_lr > 0
    assert config.training.per_device_train_batch_size >= 1
    assert config.training.gradient_accumulation_steps >= 1
    assert config.training.num_train_epochs > 0 or config.training.max_steps > 0
    assert config.training.output_dir.startswith("outputs/")
    if config.lora.train_mode == "projector+lora":
        assert config.lora.lora_rank > 0 and config.lora.target_modules


def test_the_named_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {
        "demo",
        "qwen7b_chat_clip336_stage1",
        "qwen7b_chat_clip336_stage2",
        "qwen7b_chat_siglip384",
        "qwen7b_chat_clip336_qlora",
        "qwen25_7b_clip336",
        "qwen_vl_visual_qwen2_0.5b_stage1",
        "qwen_vl_visual_qwen2_0.5b_stage2",
        "qwen_vl_visual_qwen2_0.5b_stage3",
    } <= names


def test_stage2_starts_from_stage1():
    stage1, stage2 = recipe("qwen7b_chat_clip336_stage1"), recipe("qwen7b_chat_clip336_stage2")
    assert stage1.lora.train_mode == "projector"
    assert stage1.training.feature_proj_lr == 1e-3
    assert stage1.training.num_train_epochs == 1
    assert stage2.lora.train_mode == "projector+lora"
    assert (stage2.lora.lora_rank, stage2.lora.lora_alpha) == (64, 16)
    assert stage2.lora.target_modules == "c_attn|w1|w2"
    assert stage2.projector.projector_path == stage1.training.output_dir
    assert stage2.training.feature_proj_lr < stage1.training.feature_proj_lr
    assert stage1.vision == stage2.vision  # the projector was aligned to this tower


def test_variant_recipes():
    siglip = recipe("qwen7b_chat_siglip384")
    assert siglip.vision.vision_model == "google/siglip-so400m-patch14-384"
    qlora = recipe("qwen7b_chat_clip336_qlora")
    assert qlora.language_model.bits == 4 and qlora.lora.train_mode == "projector+lora"
    qwen25 = recipe("qwen25_7b_clip336")
    assert qwen25.language_model.language_model == "Qwen/Qwen2.5-7B-Instruct"
    assert qwen25.language_model.image_token == "<|image_pad|>"
    assert "c_attn" not in qwen25.lora.target_modules  # Qwen2.5 names its linears q_proj, ...


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name
)
def test_deepspeed_configs(path, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)  # parsing needs no install
    settings = json.loads(path.read_text(encoding="utf-8"))
    assert settings["zero_optimization"]["stage"] == int(path.stem[4])  # zero2, zero3, zero3_...
    # "auto" lets the HF integration fill these from TrainingArguments, so they never disagree.
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
    ):
        assert settings[key] == "auto"
    config = load_config(CONFIGS / "demo.yaml", {"deepspeed": str(path)})
    assert config.training.deepspeed == str(path)


@pytest.mark.parametrize("path", sorted((CONFIGS / "fsdp").glob("*.json")), ids=lambda p: p.name)
def test_fsdp_configs(path):
    config = load_config(CONFIGS / "demo.yaml", {"fsdp": str(path)})
    assert config.training.fsdp == str(path)


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_launch_files(path):
    """Launcher files only: processes and machines; the engine stays train.py's flag."""
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert settings["distributed_type"] == "MULTI_GPU" and settings["mixed_precision"] == "no"
    assert not {k for k in settings if "deepspeed" in k or "fsdp" in k}
    assert settings["num_processes"] % settings["num_machines"] == 0


def test_deepspeed_flag_names_a_missing_file():
    with pytest.raises(ValueError, match="--deepspeed"):
        load_config(None, {"deepspeed": "configs/deepspeed/zero9.json"})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "pad"),  # LLaVA's convention for CLIP / SigLIP towers
        ({"vision_library": "qwen_vl"}, "resize"),  # Qwen-VL's own preprocessing
        ({"vision_library": "qwen_vl", "image_aspect_ratio": "pad"}, "pad"),  # the flag wins
        ({"image_aspect_ratio": "resize"}, "resize"),
    ],
)
def test_the_aspect_ratio_defaults_to_the_towers_own(overrides, expected):
    assert load_config(overrides=overrides).vision.image_aspect_ratio == expected


def test_the_train_script_names_recipes_that_exist():
    script = (CONFIGS.parent / "train.sh").read_text(encoding="utf-8")
    named = {Path(name).name for name in re.findall(r"configs/[\w.-]+\.yaml", script)}
    assert named and named <= {path.name for path in RECIPES}
