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
