"""Cached tokenization of records, SupervisedDataset tensors, and the collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset.build import build_supervised_dataset
from dataset.collator import SupervisedCollator
from dataset.conversation import IGNORE_INDEX
from dataset.loading import load_records
from dataset.processor import VLMProcessor
from dataset.samples import tokenize_records
from dataset.supervised import SupervisedDataset
from visual.processing import FixedGridProcessor

IMAGE_ID = 151646
N = 3
PAD = 151643  # <|endoftext|>: pad id and also a real token


def _record(record_id: str, images: list[str], answer: str = "A dot.") -> dict:
    question = "".join("<image>\n" for _ in images) + "What is it?"
    record = {
        "id": record_id,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
    }
    if images:
        record["image"] = images
    return record


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    for name, colour in [("a.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (5, 5), colour).save(tmp_path / name)
    records = [
        _record("one", ["a.png"]),
        _record("text", []),
        _record("two", ["a.png", "b.png"]),
        _record("long", ["b.png"], answer="word " * 60),  # truncated at 64 tokens
        _record("late", [], answer="x"),
    ]
    # An image after a long first answer: any cut at 64 would split or lose it -> dropped.
    records[-1]["conversations"] = [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "word " * 60},
        {"from": "human", "value": "<image>\nAnd this?"},
        {"from": "gpt", "value": "A cat."},
    ]
    records[-1]["image"] = "a.png"
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    return tmp_path


def _fake_preprocess(images: list[Image.Image]) -> torch.Tensor:
    # [n, 3, 2, 2] filled with each image's red channel / 255, so order is visible.
    return torch.stack([torch.full((3, 2, 2), image.getpixel((0, 0))[0] / 255) for image in images])


def _processor(tokenizer, tokens: int = N, preprocess=_fake_preprocess) -> VLMProcessor:
    return VLMProcessor(tokenizer, IMAGE_ID, FixedGridProcessor(preprocess, tokens))


def _tokenize(records, tokenizer):
    return tokenize_records(records, _processor(tokenizer), model_max_length=64)


def test_tokenize_records_counts_truncated_and_dropped(data: Path, tokenizer, caplog):
    records, _ = load_records(data / "data.json", image_folder=data, cache_dir=data / "cache")
    with caplog.at_level("WARNING"):
        samples, stats = _tokenize(records, tokenizer)
    assert (stats.records, stats.samples, stats.truncated, stats.dropped) == (5, 4, 1, 1)
    assert samples["id"] == ["one", "text", "two", "long"]
    assert "1 of 5 samples truncated, 1 dropped" in caplog.text and "'late'" in caplog.text
    assert samples["truncated"] == [False, False, False, True]
    for row in samples:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) <= 64
        assert row["input_ids"].count(IMAGE_ID) == N * len(row["images"])
    assert samples.cache_files  # memory-mapped Arrow, not an in-memory copy


def test_tokenization_is_cached(data: Path, tokenizer, monkeypatch: pytest.MonkeyPatch):
    records, _ = load_records(data / "data.json", image_folder=data, cache_dir=data / "cache")
    first, _ = _tokenize(records, tokenizer)
    calls = []
    real = VLMProcessor.encode
    monkeypatch.setattr(VLMProcessor, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, stats = _tokenize(records, tokenizer)
    assert calls == [] and second.cache_files == first.cache_files and stats.truncated == 1
    # A different setting is a different cache entry.
    tokenize_records(records, _processor(tokenizer, N + 1), model_max_length=64)
    assert len(calls) == len(records)


def test_supervised_dataset_and_collator(data: Path, tokenizer):
    dataset = build_supervised_dataset(
        data / "data.json",
        _processor(tokenizer),
        image_folder=data,
        load_image=lambda path: Image.open(path).convert("RGB"),
        model_max_length=64,
        skip_invalid=False,
        cache_dir=data / "cache",
    )
    assert isinstance(dataset, SupervisedDataset) and len(dataset) == 4
    assert [len(images) for images in dataset.samples["images"]] == [1, 0, 2, 1]
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(4)]
    items = [dataset[i] for i in range(3)]  # one image, text-only, two images
    assert items[1]["pixel_values"] is None
    assert items[2]["pixel_values"].shape == (2, 3, 2, 2)
    assert items[0]["input_ids"].dtype == torch.long

    batch = SupervisedCollator(pad_token_id=tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0])  # a, a, b
    assert (batch["input_ids"] == IMAGE_ID).sum() == 3 * N  # one run per stacked image


def test_collator_masks_from_lengths_not_pad_id():
    real_eod = torch.tensor([5, PAD, 7, PAD])  # <|endoftext|> inside and at the end
    short = torch.tensor([9, 8])
    samples = [
        {"input_ids": real_eod, "labels": real_eod.clone(), "pixel_values": None},
        {"input_ids": short, "labels": torch.tensor([IGNORE_INDEX, 8]), "pixel_values": None},
    ]
    batch = SupervisedCollator(pad_token_id=PAD)(samples)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"].tolist() == [[5, PAD, 7, PAD], [9, 8, PAD, PAD]]
    assert batch["labels"].tolist() == [
        [5, PAD, 7, PAD],
        [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert "pixel_values" not in batch  # text-only batch: the vision tower is skipped


def test_collator_rejects_mismatched_labels():
    sample = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1]), "pixel_values": None}
    with pytest.raises(ValueError, match="sample 0"):
        SupervisedCollator(pad_token_id=PAD)([sample])


def test_preprocess_shape_mismatch_names_the_record(data: Path, tokenizer):
    records, _ = load_records(data / "data.json", image_folder=data, cache_dir=data / "cache")
    samples, _ = _tokenize(records, tokenizer)
    dataset = SupervisedDataset(
        samples,
        image_folder=data,
        load_image=lambda path: Image.open(path),
        processor=_processor(tokenizer, preprocess=lambda images: torch.zeros(1, 3, 2, 2)),
    )
    with pytest.raises(ValueError, match="'two'.*2 image"):
        dataset[2]
