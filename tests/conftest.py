"""Shared test settings: nothing may wait on the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random QWen with the real vocabulary and tokenizer, Qwen's own init (std 0.02)."""
    from demo.tiny_models import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from demo.tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small generated shapes data set: images/, train.json, test.json."""
    from demo.shapes import generate_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, num_train=48, num_test=8, seed=1)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    """The Qwen-7B tokenizer (its vocabulary ships with the repo)."""
    from qwen import QWenTokenizer

    return QWenTokenizer()


def save_tiny_checkpoint(out, qwen_dir, clip_dir, *, system_prompt="s", relative_to=None):
    """A tiny random LoRA checkpoint as training saves one (seeded, so every build is the same);
    with `relative_to`, base paths recorded relative to that directory, as a user would type them."""
    import torch

    from model.builder import build_vlm
    from model.checkpoint import describe, save_trainable
    from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
    from model.trainable import configure_trainable

    paths = [str(qwen_dir), str(clip_dir)]
    if relative_to is not None:
        paths = [os.path.relpath(path, relative_to) for path in paths]
    language = LanguageModelConfig(language_model=paths[0], dtype="float32")
    vision = VisionConfig(vision_model=paths[1])
    cwd = os.getcwd()
    try:
        os.chdir(relative_to or cwd)
        torch.manual_seed(0)
        vlm, tokenizer = build_vlm(language, vision, ProjectorConfig())
        configure_trainable(vlm, LoraSettings(lora_rank=4))
        description = describe(
            vlm, language, vision, ProjectorConfig(), system_prompt=system_prompt
        )
    finally:
        os.chdir(cwd)
    save_trainable(vlm, tokenizer, out, description)
    return out


def truncate(path) -> None:
    """Cut a file to half its size, as a kill during a write or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def held_out(shapes_dir, index: int):
    """A test-split image of the shapes data and its first question (without the <image> marker)."""
    import json

    record = json.loads((shapes_dir / "test.json").read_text(encoding="utf-8"))[index]
    return shapes_dir / record["image"], record["conversations"][0]["value"].split("\n", 1)[1]


def answer_of_test_py(checkpoint, image, question: str, max_new_tokens: int = 8) -> str:
    """What `python test.py --image_path IMAGE --prompt QUESTION` prints as the answer."""
    import contextlib
    import importlib.util
    import io
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "test.py"
    spec = importlib.util.spec_from_file_location("prompt_test", script)
    prompt_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prompt_test)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prompt_test.main(["--model_weights", str(checkpoint), "--dtype", "float32",
                          "--image_path", str(image), "--prompt", question,
                          "--max_new_tokens", str(max_new_tokens)])  # fmt: skip
    return out.getvalue().rstrip("\n").split("\t", 1)[1]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_flags(
    language_model, vision_model, data_path, image_folder, out, /, **settings
) -> list[str]:
    """`train.py` flags of a short CPU run on tiny models; `settings` add or override flags,
    the positional ones too (`True` is a switch)."""
    settings = {
        "language_model": language_model,
        "dtype": "float32",
        "vision_model": vision_model,
        "data_path": data_path,
        "image_folder": image_folder,
        "model_max_length": 128,
        "output_dir": out,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_steps": 1000,
        **settings,
    }
    switches = [f"--{key}" for key, value in settings.items() if value is True]
    values = {key: value for key, value in settings.items() if value is not True}
    return switches + [item for key, value in values.items() for item in (f"--{key}", str(value))]
