"""Data loading without silent loss: one validator for the CLI and training, image paths confined
to the image folder, broken lines counted, clear errors for empty data, and the tower's facts
(tokens per image, mean colour) read from the tower by `dataprocess stats` / `images`."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dataprocess.__main__ import main
from dataprocess.schema import RecordError
from dataset.build import build_supervised_dataset
from dataset.loading import load_records
from dataset.packing import PackedDataset
from dataset.processor import VLMProcessor
from dataset.samples import records_fingerprint
from dataset.supervised import SupervisedDataset
from visual.processing import FixedGridProcessor

IMAGE_ID = 151646  # <|extra_0|>
N = 3


def _record(record_id: str, image: str | None = None, answer: str = "A dot.") -> dict:
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    question = "<image>\nWhat is it?" if image is not None else "What is it?"
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": answer},
    ]
    return record


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4), "red").save(images / "ok.png")
    noise = random.Random(0).randbytes(64 * 64 * 3)
    Image.frombytes("RGB", (64, 64), noise).save(images / "whole.png")
    data = (images / "whole.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])  # the header still parses
    return images


def _fake_preprocess(images: list[Image.Image]) -> torch.Tensor:
    return torch.zeros(len(images), 3, 2, 2)


def _build(path: Path, tokenizer, folder: Path | None, **options):
    settings = {
        "image_folder": folder,
        "load_image": lambda p: Image.open(p).convert("RGB"),
        "model_max_length": 64,
        "cache_dir": path.parent / "cache",
        **options,
    }
    processor = VLMProcessor(tokenizer, IMAGE_ID, FixedGridProcessor(_fake_preprocess, N))
    return build_supervised_dataset(path, processor, **settings)


def test_training_and_cli_share_one_validator(folder: Path) -> None:
    path = _write(
        folder.parent / "data.json",
        [
            _record("ok", "ok.png"),
            _record("cut", "truncated.png"),  # header fine, pixels missing: needs a full decode
            _record("token", answer="<|im_end|> hi"),
            _record("box", answer="<box>(5,5),(5,9)</box>"),
            _record("ok"),
        ],
    )
    with pytest.raises(ValueError) as info:
        load_records(path, image_folder=folder, cache_dir=folder.parent / "cache")
    message = str(info.value)
    expected = {
        "unreadable_image": "cut",
        "special_token": "token",
        "box_out_of_range": "box",
        "duplicate_id": "ok",
    }
    assert "4 of 5 records" in message and str(path) in message
    for kind, record_id in expected.items():
        assert f"{kind}: 1" in message and f"record {record_id!r}" in message
    assert main(["validate", "--data", str(path), "--image_folder", str(folder)]) == 1
    report = json.loads(path.with_suffix(".report.json").read_text(encoding="utf-8"))
    errors = report["sources"]["data.json"]["errors"]
    assert {kind: entry["examples"] for kind, entry in errors.items()} == {
        kind: [record_id] for kind, record_id in expected.items()
    }


def test_image_paths_are_confined_to_the_image_folder(folder: Path, tokenizer, capsys) -> None:
    outside = folder.parent / "outside.png"
    Image.new("RGB", (4, 4), "blue").save(outside)
    records = [
        _record("abs", str(outside)),
        _record("up", "../outside.png"),
        _record("in", "missing_dir/../ok.png"),  # normalised, it stays inside
    ]
    path = _write(folder.parent / "data.json", records)
    cache = folder.parent / "cache"
    with pytest.raises(ValueError, match=r"image_outside_folder: 2") as info:
        load_records(path, image_folder=folder, cache_dir=cache)
    assert "record 'abs'" in str(info.value) and "record 'up'" in str(info.value)
    kept, _ = load_records(path, image_folder=folder, skip_invalid=True, cache_dir=cache)
    assert kept["id"] == ["in"]
    base = ["validate", "--data", str(path), "--image_folder", str(folder)]
    assert main(base) == 1
    assert main([*base, "--allow_outside_image_folder"]) == 0
    capsys.readouterr()

    opened: list[Path] = []

    def load_image(image_path: Path) -> Image.Image:
        opened.append(Path(image_path))
        return Image.open(image_path).convert("RGB")

    dataset = _build(
        path, tokenizer, folder, load_image=load_image, allow_outside_image_folder=True
    )
    for index in range(len(dataset)):
        dataset[index]
    # The files opened are the confined paths the validator checked ("missing_dir/.." does not
    # exist on disk, so only the normalised path opens).
    assert opened == [outside, Path(os.path.normpath(outside)), folder / "ok.png"]


def test_broken_jsonl_line_is_dropped_counted_and_the_rest_kept(tmp_path: Path, capsys) -> None:
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps(_record("a")), '{"id": "b", "conversations": [', json.dumps(_record("c"))]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    good = tmp_path / "good.jsonl"
    assert main(["validate", "--data", str(data), "--drop_invalid", "--output", str(good)]) == 0
    kept = [json.loads(line)["id"] for line in good.read_text(encoding="utf-8").splitlines()]
    assert kept == ["a", "c"]
    assert "dropped: 1" in capsys.readouterr().out
    (dropped,) = [json.loads(x) for x in (tmp_path / "good.dropped.jsonl").read_text().splitlines()]
    assert dropped["kind"] == "invalid_json" and dropped["file"] == str(data)
    assert "line 2" in dropped["message"]
    # Training counts the same slot as one invalid record and keeps the records after it.
    records, report = load_records(data, skip_invalid=True, cache_dir=tmp_path / "cache")
    assert records["id"] == ["a", "c"] and report.num_invalid == 1


def test_unparsable_json_list_is_refused_naming_file_and_position(tmp_path: Path, capsys) -> None:
    data = tmp_path / "chat.json"
    data.write_text("[\n" + json.dumps(_record("a")) + ',\n{"id": "b",,}\n]', encoding="utf-8")
    out = tmp_path / "good.json"
    assert main(["validate", "--data", str(data), "--drop_invalid", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "line 3, column" in err
    assert not out.exists()
    with pytest.raises(RecordError, match=re.escape(str(data)) + r".*line 3, column"):
        load_records(data, cache_dir=tmp_path / "cache")


def test_empty_and_all_invalid_data_are_clear_errors(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    empty = _write(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match=f"no records in {re.escape(str(empty))}"):
        load_records(empty, cache_dir=cache)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n", encoding="utf-8")
    with pytest.raises(RecordError, match=f"{re.escape(str(blank))}: file is empty"):
        load_records(blank, cache_dir=cache)
    bad = _write(tmp_path / "bad.json", [{"id": "x", "conversations": []}])
    for skip_invalid in (False, True):
        with pytest.raises(ValueError, match=f"no valid records in {re.escape(str(bad))}") as info:
            load_records(bad, skip_invalid=skip_invalid, cache_dir=cache)
        assert "no_assistant_turn: 1" in str(info.value) and "'x'" in str(info.value)


def test_every_sample_too_long_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    path = _write(tmp_path / "data.json", [_record("a", answer="word " * 20), _record("b")])
    pattern = (
        r"--model_max_length 8 is shorter than every sample of .*data\.json "
        r"\(all 2 dropped; the shortest needs (\d+) tokens\)"
    )
    with pytest.raises(ValueError, match=pattern) as info:
        _build(path, tokenizer, None, model_max_length=8)
    needed = int(re.search(pattern, str(info.value)).group(1))
    assert len(_build(path, tokenizer, None, model_max_length=needed)) >= 1
    with pytest.raises(ValueError, match="shorter than every sample"):
        _build(path, tokenizer, None, model_max_length=needed - 1)


def test_packing_with_every_sample_dropped_is_the_same_clear_error(
    tmp_path: Path, tokenizer
) -> None:
    from runtime.config import DataConfig
    from runtime.data import build_datasets

    path = _write(tmp_path / "data.json", [_record("a"), _record("b")])
    config = DataConfig(data_path=str(path), image_folder=None, model_max_length=8, packing=True)
    vlm = SimpleNamespace(
        vision=SimpleNamespace(preprocessor=_fake_preprocess), image_token_id=IMAGE_ID,
        num_image_tokens=N, image_processor=FixedGridProcessor(_fake_preprocess, N),
    )  # fmt: skip
    with pytest.raises(ValueError, match="--model_max_length 8 is shorter than every sample"):
        build_datasets(config, vlm, tokenizer)
    with pytest.raises(ValueError, match=f"no samples to pack in {re.escape(str(path))}"):
        PackedDataset(_NoSamples(str(path)), capacity=8)


class _NoSamples(torch.utils.data.Dataset):
    """What PackedDataset would see if a dataset with nothing left reached it."""

    def __init__(self, source: str) -> None:
        self.source, self.lengths = source, []

    def __len__(self) -> int:
        return 0


def test_feature_cache_checks_the_image_folder_and_says_which_is_read(
    tiny_clip_dir, shapes_dir, tmp_path, tokenizer, caplog
) -> None:
    from dataprocess.process_image import referenced_images
    from runtime.config import DataConfig
    from runtime.data import build_datasets
    from visual import load_vision_tower
    from visual.feature_cache import encode_feature_cache

    data = shapes_dir / "test.json"
    tower = load_vision_tower(str(tiny_clip_dir))
    cache = encode_feature_cache(
        tower, referenced_images(data), shapes_dir, tmp_path / "features", dtype="float32"
    )
    vlm = SimpleNamespace(
        vision=tower, image_token_id=IMAGE_ID, num_image_tokens=16,
        image_processor=FixedGridProcessor(tower.preprocessor, 16),
    )  # fmt: skip
    config = DataConfig(
        data_path=str(data), image_folder=str(tmp_path / "nowhere"), feature_cache=str(cache)
    )
    with pytest.raises(ValueError, match=r"--image_folder .*nowhere: no such directory"):
        build_datasets(config, vlm, tokenizer)
    config.image_folder = str(shapes_dir)
    with caplog.at_level("INFO", logger="runtime.data"):
        train, _, _ = build_datasets(config, vlm, tokenizer)
    assert f"features read from --feature_cache {cache}" in caplog.text
    assert train[0]["vision_features"].shape[1:] == (16, 64)


def test_stats_reads_tokens_per_image_from_the_tower_or_the_checkpoint(
    tiny_clip_dir, tmp_path, tokenizer, capsys
) -> None:
    from dataset.conversation import encode_conversation
    from qwen.chat_format import DEFAULT_SYSTEM_PROMPT

    data = _write(tmp_path / "data.json", [_record("a", "ok.png")])

    def expected(num_image_tokens: int, system: str) -> int:
        contents = ["<image>\nWhat is it?", "A dot."]
        return len(
            encode_conversation(
                tokenizer, ["user", "assistant"], contents, image_token_id=IMAGE_ID,
                num_image_tokens=num_image_tokens, system_prompt=system,
            ).input_ids
        )  # fmt: skip

    def stats(*flags: str) -> dict:
        assert main(["stats", "--data", str(data), *flags]) == 0
        return json.loads(capsys.readouterr().out)

    from_tower = stats("--vision_model", str(tiny_clip_dir))
    assert (from_tower["num_image_tokens"], from_tower["num_image_tokens_from"]) == (
        16,
        "--vision_model",
    )
    assert from_tower["max"] == expected(16, DEFAULT_SYSTEM_PROMPT)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    description = {"num_image_tokens": 7, "system_prompt": "Be brief."}
    (checkpoint / "vlm_config.json").write_text(json.dumps(description), encoding="utf-8")
    from_checkpoint = stats("--model_weights", str(checkpoint))
    assert from_checkpoint["max"] == expected(7, "Be brief.")
    assert stats("--model_weights", str(checkpoint), "--num_image_tokens", "5")["max"] == expected(
        5, "Be brief."
    )
    assert main(["stats", "--data", str(data)]) == 2
    assert "--vision_model" in capsys.readouterr().err
    mismatch = ["--model_weights", str(checkpoint), "--vision_model", str(tiny_clip_dir)]
    assert main(["stats", "--data", str(data), *mismatch]) == 2
    assert "16 tokens per image" in capsys.readouterr().err


def test_images_pad_with_the_towers_mean_colour(tiny_clip_dir, tmp_path: Path, capsys) -> None:
    from demo.tiny_towers import save_tiny_siglip_tower
    from visual import load_vision_tower

    siglip = save_tiny_siglip_tower(tmp_path / "siglip")
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "wide.png")
    data = _write(tmp_path / "data.json", [_record("a", "wide.png")])

    def images(cache: str, *flags: str) -> int:
        args = ["images", "--data", str(data), "--image_folder", str(root)]
        return main([*args, "--cache", str(tmp_path / cache), *flags])

    assert images("siglip-cache", "--pad", "--vision_model", str(siglip)) == 0
    assert json.loads(capsys.readouterr().out)["pad_color"] == [127, 127, 127]
    with Image.open(tmp_path / "siglip-cache" / "wide.png") as image:
        assert image.size == (32, 32)  # the tower's input size
        assert image.getpixel((16, 0)) == (127, 127, 127)  # SigLIP mean 0.5 -> grey
        assert image.getpixel((16, 16)) == (255, 0, 0)
    assert images("clip-cache", "--pad", "--vision_model", str(tiny_clip_dir)) == 0
    clip_mean = load_vision_tower(str(tiny_clip_dir)).preprocessor.fill_color
    assert json.loads(capsys.readouterr().out)["pad_color"] == list(clip_mean)
    assert clip_mean != (127, 127, 127)
    assert images("no-tower", "--pad", "--size", "32") == 2
    assert "--pad needs --vision_model" in capsys.readouterr().err


def test_records_fingerprint_uses_public_datasets_api(folder: Path) -> None:
    path = _write(folder.parent / "data.json", [_record("a"), _record("b")])
    records, _ = load_records(path, cache_dir=folder.parent / "cache")
    again, _ = load_records(path, cache_dir=folder.parent / "cache")
    assert records_fingerprint(records) == records_fingerprint(again)
    assert records_fingerprint(records.select([1, 0])) != records_fingerprint(records)
    assert not hasattr(SupervisedDataset, "num_images")  # dead code removed
