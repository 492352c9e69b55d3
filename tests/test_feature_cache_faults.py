"""`python -m dataprocess features` with a bad image: one line naming the record and the file, no
cache left; and no more decoding workers by default than the machine has cores to spare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import visual.feature_cache as feature_cache
from dataprocess.__main__ import main as dataprocess_main


def _record(record_id: str, image: str) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dot."}]
    return {"id": record_id, "image": image, "conversations": turns}


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16), "red").save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    records = [_record("first", "a.png"), _record("bad-one", "broken.png"), _record("c", "b.png")]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _argv(data: Path, tiny_clip_dir, out: Path, *extra: str) -> list[str]:
    folder = data.parent / "images"
    argv = ["features", "--data", str(data), "--image_folder", str(folder)]
    return [*argv, "--vision_model", str(tiny_clip_dir), "--out", str(out), *extra]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_undecodable_image_names_record_and_file(data, tiny_clip_dir, tmp_path, capsys, workers):
    out = tmp_path / "cache"
    argv = _argv(data, tiny_clip_dir, out, "--workers", workers, "--batch_size", "2")
    assert dataprocess_main(argv) == 2
    stderr = capsys.readouterr().err
    [error] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr
    assert "record 'bad-one' of" in error and str(data) in error and "broken.png" in error
    assert not out.exists() and not out.with_name("cache.partial").exists()


def test_default_workers_leave_a_core_to_the_main_process(
    data, tiny_clip_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(feature_cache.os, "cpu_count", lambda: 2)
    assert feature_cache.default_workers() == 1
    monkeypatch.setattr(feature_cache.os, "cpu_count", lambda: 32)
    assert feature_cache.default_workers() == 4
    monkeypatch.setattr(feature_cache.os, "cpu_count", lambda: 1)
    seen = []
    encode = feature_cache.encode_feature_cache

    def spy(*args, num_workers, **kwargs):
        seen.append(num_workers)
        return encode(*args, num_workers=num_workers, **kwargs)

    monkeypatch.setattr(feature_cache, "encode_feature_cache", spy)
    (data.parent / "images" / "broken.png").unlink()
    Image.new("RGB", (8, 8), "blue").save(data.parent / "images" / "broken.png")
    assert dataprocess_main(_argv(data, tiny_clip_dir, tmp_path / "cache")) == 0
    assert seen == [0]  # one core: the main process decodes, no worker competes with it
