"""Frozen-tower feature cache: exact rows, refusal of a mismatching cache, atomic writes, equal
loss to live encoding (one batch and a short training run), and the `dataprocess features` CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import train_flags

import train
from dataprocess.__main__ import main as dataprocess_main
from dataprocess.process_image import referenced_images
from model.builder import build_vlm
from model.trainable import configure_trainable
from runtime.config import load_config
from runtime.data import build_datasets
from visual import VisionTower, load_image, load_vision_tower
from visual.feature_cache import FeatureCache, encode_feature_cache, tower_cache_settings


@pytest.fixture(scope="module")
def tower(tiny_clip_dir):
    return load_vision_tower(str(tiny_clip_dir), feature_layer=-2, image_aspect_ratio="pad")


@pytest.fixture(scope="module")
def cli_cache(tiny_clip_dir, shapes_dir, tmp_path_factory):
    """A float32 cache of the train and test images, written by the CLI."""
    out = tmp_path_factory.mktemp("features") / "cache"
    argv = ["features", "--data", str(shapes_dir / "train.json"), str(shapes_dir / "test.json")]
    argv += ["--image_folder", str(shapes_dir), "--vision_model", str(tiny_clip_dir)]
    argv += ["--dtype", "float32", "--batch_size", "16", "--workers", "0", "--out", str(out)]
    assert dataprocess_main(argv) == 0
    return out


def live_features(tower, folder: Path, paths: list[str]) -> torch.Tensor:
    return tower(tower.preprocess([load_image(folder / p) for p in paths]))  # [n, N, Dv]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_equal_the_tower_output(tower, shapes_dir, tmp_path, dtype):
    paths = referenced_images(shapes_dir / "test.json")
    out = encode_feature_cache(
        tower, paths + paths[:2], shapes_dir, tmp_path / "cache", batch_size=3, dtype=dtype
    )
    cache = FeatureCache(out)
    assert cache.images == paths and len(cache) == len(paths)  # duplicates encoded once
    assert cache.array.shape == (len(paths), tower.num_image_tokens, tower.hidden_size)
    picked = [paths[5], paths[0], paths[5]]
    expected = live_features(tower, shapes_dir, picked)
    stored = cache.features(picked)
    assert stored.dtype == getattr(torch, dtype)
    torch.testing.assert_close(stored, expected.to(stored.dtype), rtol=0, atol=0)
    revived = pickle.loads(pickle.dumps(cache))  # as in a DataLoader worker: the array reopens
    assert revived._array is None
    torch.testing.assert_close(revived.features(picked), stored, rtol=0, atol=0)
    index = json.loads((out / "index.json").read_text())
    assert index["settings"] == tower_cache_settings(tower) and index["dtype"] == dtype
    assert index["settings"]["feature_layer"] == -2 and index["settings"]["image_size"] == 32


def test_mismatch_and_missing_images_are_named(tower, tiny_clip_dir, shapes_dir, tmp_path):
    paths = referenced_images(shapes_dir / "test.json")
    cache = FeatureCache(encode_feature_cache(tower, paths, shapes_dir, tmp_path / "c"))
    cache.check_matches(tower_cache_settings(tower))  # the same tower: fine
    other = load_vision_tower(str(tiny_clip_dir), feature_layer=-1, image_aspect_ratio="resize")
    with pytest.raises(ValueError, match="feature_layer: cache -2 vs model -1") as error:
        cache.check_matches(tower_cache_settings(other))
    assert "image_aspect_ratio: cache 'pad' vs model 'resize'" in str(error.value)
    with pytest.raises(ValueError, match=r"'images/nope.png' is not in the feature cache .*c"):
        cache.features([paths[0], "images/nope.png"])
    with pytest.raises(FileExistsError, match="already exists"):
        encode_feature_cache(tower, paths, shapes_dir, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_an_interrupted_encode_leaves_no_cache(tower, shapes_dir, tmp_path, monkeypatch):
    paths = referenced_images(shapes_dir / "test.json")
    out = tmp_path / "cache"
    (tmp_path / "cache.partial").mkdir()  # left by a killed run: replaced, then removed
    calls = []

    def interrupted(pixel_values):
        calls.append(len(pixel_values))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return type(tower).forward(tower, pixel_values)

    monkeypatch.setattr(tower, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_feature_cache(tower, paths, shapes_dir, out, batch_size=3)
    assert calls == [3, 3] and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match="missing.png"):  # an unreadable image, mid-way
        encode_feature_cache(tower, [*paths, "images/missing.png"], shapes_dir, out, batch_size=3)
    assert list(tmp_path.iterdir()) == []


def data_config(tiny_qwen_dir, tiny_clip_dir, shapes_dir, **overrides):
    settings = {
        "language_model": str(tiny_qwen_dir),
        "dtype": "float32",
        "vision_model": str(tiny_clip_dir),
        "data_path": str(shapes_dir / "train.json"),
        "image_folder": str(shapes_dir),
        "model_max_length": 128,
        "train_mode": "projector",
        **overrides,
    }
    return load_config(None, settings)


def test_cached_batch_gives_the_live_loss(tiny_qwen_dir, tiny_clip_dir, shapes_dir, cli_cache):
    config = data_config(tiny_qwen_dir, tiny_clip_dir, shapes_dir)
    vlm, tokenizer = build_vlm(config.language_model, config.vision, config.projector)
    configure_trainable(vlm, config.lora)
    live, _, collator = build_datasets(config.data, vlm, tokenizer)
    config.data.feature_cache = str(cli_cache)
    cached, _, _ = build_datasets(config.data, vlm, tokenizer)
    live_batch = collator([live[i] for i in (0, 3, 7, 11)])
    cached_batch = collator([cached[i] for i in (0, 3, 7, 11)])
    assert "pixel_values" not in cached_batch and "vision_features" not in live_batch
    assert cached_batch["vision_features"].shape == (4, 16, 64)  # [n_img, N, Dv]
    vlm.train()
    live_loss = vlm(**live_batch).loss
    cached_loss = vlm(**cached_batch).loss
    torch.testing.assert_close(cached_loss, live_loss, rtol=0, atol=1e-6)
    cached_loss.backward()  # the projector trains from cached features
    assert next(vlm.projector.parameters()).grad is not None

    other = load_vision_tower(str(tiny_clip_dir), feature_layer=-1, image_aspect_ratio="pad")
    vlm.vision = other
    with pytest.raises(ValueError, match="feature_layer: cache -2 vs model -1"):
        build_datasets(config.data, vlm, tokenizer)


def test_uncovered_records_are_named(tower, tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path):
    paths = referenced_images(shapes_dir / "test.json")  # not the train images
    cache = encode_feature_cache(tower, paths, shapes_dir, tmp_path / "c", dtype="float32")
    config = data_config(tiny_qwen_dir, tiny_clip_dir, shapes_dir, feature_cache=str(cache))
    vlm, tokenizer = build_vlm(config.language_model, config.vision, config.projector)
    with pytest.raises(ValueError, match=r"48 image\(s\) .* of record 'shapes_train_"):
        build_datasets(config.data, vlm, tokenizer)


def run_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir, out, **extra) -> list[str]:
    settings = {"train_mode": "projector", "per_device_train_batch_size": 4, "max_steps": 4,
                "feature_proj_lr": 1e-2, "seed": 3, **extra}  # fmt: skip
    data = shapes_dir / "train.json"
    return train_flags(tiny_qwen_dir, tiny_clip_dir, data, shapes_dir, out, **settings)


@pytest.mark.slow
def test_training_from_the_cache_matches_live_training(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, cli_cache, tmp_path, monkeypatch
):
    args = (tiny_qwen_dir, tiny_clip_dir, shapes_dir)
    live = train.main(run_flags(*args, tmp_path / "live"))

    def no_tower(self, pixel_values):
        raise AssertionError("the vision tower ran in a run from the feature cache")

    monkeypatch.setattr(VisionTower, "forward", no_tower)
    cached = train.main(  # one worker process: the cache is pickled and reopened there
        run_flags(*args, tmp_path / "cached", feature_cache=cli_cache, dataloader_num_workers=1)
    )
    live_losses = [e["loss"] for e in live.state.log_history if "loss" in e]
    cached_losses = [e["loss"] for e in cached.state.log_history if "loss" in e]
    assert len(live_losses) == 4 and live_losses[0] != live_losses[-1]
    assert cached_losses == pytest.approx(live_losses, abs=1e-5)


def test_cli_reports_and_refuses_to_overwrite(
    cli_cache, shapes_dir, tiny_clip_dir, tmp_path, capsys
):
    index = json.loads((cli_cache / "index.json").read_text())
    expected = referenced_images(shapes_dir / "train.json") + referenced_images(
        shapes_dir / "test.json"
    )
    assert index["images"] == expected and index["dtype"] == "float32"
    argv = ["features", "--data", str(shapes_dir / "test.json"), "--image_folder", str(shapes_dir)]
    argv += ["--vision_model", str(tiny_clip_dir), "--workers", "0"]
    assert dataprocess_main([*argv, "--out", str(tmp_path / "c")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 8 and report["shape"] == [8, 16, 64]
    assert report["bytes"] >= 8 * 16 * 64 * 2 and report["dtype"] == "float16"
    assert dataprocess_main([*argv, "--out", str(cli_cache)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dataprocess_main([*argv, "--dtype", "float64", "--out", str(tmp_path / "d")])
