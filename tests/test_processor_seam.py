"""The processor seam with a size-dependent image processor: placeholder ids == feature rows.

`_SizeDependent` stands in for AnyRes: its token count and its number of tiles depend on the
image size. Records with 0-3 images of random sizes go through the real pipeline (header sizes
at tokenization, truncation, packing, the collator); every batch must hold exactly as many
placeholder ids as the rows its images produce, and the splice must put each image's rows on
that image's run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset.build import build_supervised_dataset
from dataset.collator import SupervisedCollator
from dataset.packing import PackedCollator, PackedDataset
from dataset.processor import VLMProcessor
from qwen.splice import splice_image_features
from visual.image_io import load_image, read_image_size
from visual.processing import FixedGridProcessor, ImageProcessor

IMAGE_ID = 151646


@dataclass(frozen=True)
class _SizeDependent:
    """1 + (h % 5) + (w % 3) tokens; one tile, two for a landscape image."""

    fixed_num_image_tokens = None

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        height, width = image_size
        return 1 + height % 5 + width % 3

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tiles = 2 if image.width > image.height else 1
        return torch.full((tiles, 3, 2, 2), float(image.getpixel((0, 0))[0]))

    def pixel_values(self, images) -> torch.Tensor:
        return torch.cat([self.preprocess(image) for image in images])  # [all tiles, 3, 2, 2]


def _records(folder: Path, count: int, rng: random.Random) -> list[dict]:
    records = []
    for index in range(count):
        names = []
        for slot in range(rng.randint(0, 3)):
            name = f"{index}_{slot}.png"
            size = (rng.randint(1, 40), rng.randint(1, 40))  # (width, height)
            Image.new("RGB", size, (index % 256, slot, 0)).save(folder / name)
            names.append(name)
        split = rng.randint(0, len(names))  # images of the second question may be cut off
        first = "".join("<image>\n" for _ in names[:split]) + "word " * rng.randint(1, 30)
        second = "".join("<image>\n" for _ in names[split:]) + "and?"
        turns = [first, "yes " * rng.randint(1, 30), second, "ok"]
        record = {
            "id": f"r{index}",
            "conversations": [
                {"from": "human" if turn % 2 == 0 else "gpt", "value": value}
                for turn, value in enumerate(turns)
            ],
        }
        if names:
            record["image"] = names
        records.append(record)
    return records


def _build(folder: Path, tokenizer, max_length: int, processor=None):
    processor = processor or VLMProcessor(tokenizer, IMAGE_ID, _SizeDependent())
    return build_supervised_dataset(
        folder / "data.json",
        processor,
        image_folder=folder,
        load_image=load_image,
        read_image_size=read_image_size,
        model_max_length=max_length,
        cache_dir=folder / "cache",
    )


def _check_batch(batch: dict, processor: _SizeDependent) -> None:
    """Placeholders == rows, and image i's rows land on image i's run."""
    sizes = batch.get("image_sizes", torch.zeros(0, 2, dtype=torch.long))
    counts = [processor.num_image_tokens(tuple(size)) for size in sizes.tolist()]
    rows = torch.cat(
        [torch.full((count, 1), float(i)) for i, count in enumerate(counts)] or [torch.zeros(0, 1)]
    )  # [total_rows, 1]: each row holds its image's number, images in batch order
    placeholders = batch["input_ids"] == IMAGE_ID  # [B, L]
    assert int(placeholders.sum()) == rows.shape[0]
    spliced = splice_image_features(
        torch.full((*batch["input_ids"].shape, 1), -1.0), batch["input_ids"], rows, IMAGE_ID
    )
    expected = torch.repeat_interleave(
        torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long)
    )
    assert spliced[placeholders][:, 0].long().tolist() == expected.tolist()
    if counts:  # one row short: refused, naming both counts
        with pytest.raises(
            ValueError, match=f"{rows.shape[0]} placeholder .* {rows.shape[0] - 1} image"
        ):
            splice_image_features(
                torch.zeros(*batch["input_ids"].shape, 1), batch["input_ids"], rows[1:], IMAGE_ID
            )


@pytest.mark.parametrize("seed", [0, 1])
def test_placeholders_equal_feature_rows_under_truncation_and_packing(tmp_path, tokenizer, seed):
    rng = random.Random(seed)
    records = _records(tmp_path, 40, rng)
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    dataset = _build(tmp_path, tokenizer, max_length=80)  # cuts long answers
    assert 0 < len(dataset) <= len(records) and any(dataset.samples["truncated"])
    processor = _SizeDependent()
    for index in range(len(dataset)):
        sample = dataset[index]
        assert len(sample["input_ids"]) <= 80
        if sample["image_sizes"] is not None:  # sizes are the decoded images' (height, width)
            tiles = sum(2 if w > h else 1 for h, w in sample["image_sizes"].tolist())
            assert sample["pixel_values"].shape[0] == tiles
    collator = SupervisedCollator(pad_token_id=tokenizer.pad_token_id)
    order = list(range(len(dataset)))
    rng.shuffle(order)
    for start in range(0, len(order), 6):
        _check_batch(collator([dataset[i] for i in order[start : start + 6]]), processor)
    packed = PackedDataset(dataset, capacity=80)
    assert sum(packed.lengths) == sum(dataset.lengths)
    packed_collator = PackedCollator(collator)
    for start in range(0, len(packed), 3):
        rows = [packed[i] for i in range(start, min(start + 3, len(packed)))]
        _check_batch(packed_collator(rows), processor)


def test_fixed_grid_counts_do_not_need_sizes(tokenizer):
    fixed = VLMProcessor(tokenizer, IMAGE_ID, FixedGridProcessor(lambda images: None, 4))
    roles, contents = ["user", "assistant"], ["<image>\n<image>\nHi", "Yo"]
    plain = fixed.encode(roles, contents)
    assert plain.input_ids == fixed.encode(roles, contents, [(5, 7), (300, 2)]).input_ids
    assert plain.input_ids.count(IMAGE_ID) == 8
    assert isinstance(FixedGridProcessor(lambda images: None, 4), ImageProcessor)
    varying = VLMProcessor(tokenizer, IMAGE_ID, _SizeDependent())
    with pytest.raises(ValueError, match="pass image_sizes"):
        varying.encode(roles, contents)
    encoded = varying.encode(roles, contents, [(5, 7), (3, 2)])
    assert encoded.input_ids.count(IMAGE_ID) == (1 + 0 + 1) + (1 + 3 + 2)
    with pytest.raises(ValueError, match="more <image> markers"):
        varying.encode(roles, contents, [(5, 7)])
    with pytest.raises(ValueError, match="3 image token counts"):
        varying.encode(roles, contents, [(5, 7)] * 3)


def test_a_record_whose_images_alone_exceed_the_length_is_refused(tmp_path, tokenizer):
    Image.new("RGB", (2, 4), "red").save(tmp_path / "big.png")  # 1 + 4 + 2 = 7 tokens
    records = _records(tmp_path, 3, random.Random(0))
    records.append(
        {
            "id": "too-big",
            "image": ["big.png"] * 3,
            "conversations": [
                {"from": "human", "value": "<image>" * 3},
                {"from": "gpt", "value": "a"},
            ],
        }
    )
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"record 'too-big' .*images alone take 21 tokens.*--model_max_length 20"
    ):
        _build(tmp_path, tokenizer, max_length=20)


def test_header_size_follows_exif_orientation(tmp_path):
    image = Image.new("RGB", (6, 3), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: decoded as 3 wide, 6 high
    image.save(tmp_path / "rotated.jpg", exif=exif)
    decoded = load_image(tmp_path / "rotated.jpg")
    assert read_image_size(tmp_path / "rotated.jpg") == (decoded.height, decoded.width) == (6, 3)


def test_a_changed_image_is_caught_naming_the_record(tmp_path, tokenizer):
    records = _records(tmp_path, 6, random.Random(3))
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    dataset = _build(tmp_path, tokenizer, max_length=200)
    index = next(i for i, images in enumerate(dataset.samples["images"]) if images)
    name = dataset.samples["images"][index][0]
    height, width = read_image_size(tmp_path / name)
    Image.new("RGB", (width + 1, height + 1)).save(tmp_path / name)  # another count
    record_id = dataset.samples["id"][index]
    with pytest.raises(ValueError, match=f"record '{record_id}'.*image tokens"):
        dataset[index]


def test_stats_count_size_dependent_images_as_training_does(tmp_path, tokenizer):
    from dataprocess.stats import run_stats

    records = _records(tmp_path, 12, random.Random(5))
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    lengths = sorted(_build(tmp_path, tokenizer, max_length=4096).lengths)
    summary = run_stats(
        tmp_path / "data.json", _SizeDependent(), tmp_path / "h.png", tokenizer=tokenizer,
        image_folder=tmp_path, system="You are a helpful assistant.",
    )  # fmt: skip
    assert (summary["min"], summary["max"], summary["records"]) == (lengths[0], lengths[-1], 12)
    assert summary["mean"] == round(sum(lengths) / len(lengths), 1)
    assert summary["num_image_tokens"] is None
    with pytest.raises(ValueError, match="--image_folder"):
        run_stats(tmp_path / "data.json", _SizeDependent(), tokenizer=tokenizer)


def test_feature_cache_refuses_size_dependent_counts_in_one_line():
    from visual.feature_cache import check_fixed_grid

    check_fixed_grid(FixedGridProcessor(None, 4))  # a fixed grid is fine
    with pytest.raises(ValueError, match=r"^--feature_cache .*_SizeDependent[^\n]*$"):
        check_fixed_grid(_SizeDependent())


def test_llava_export_asks_the_processor_and_refuses_size_dependent_counts():
    from types import SimpleNamespace

    from runtime.export.llava import tokens_per_image

    assert tokens_per_image(SimpleNamespace(image_processor=FixedGridProcessor(None, 9))) == 9
    with pytest.raises(ValueError, match="size-dependent"):
        tokens_per_image(SimpleNamespace(image_processor=_SizeDependent()))


def test_the_model_splices_size_dependent_rows_through_image_rows(
    tiny_qwen_dir, tiny_clip_dir, monkeypatch
):
    """A stand-in for AnyRes's model-side packing: image i keeps its first count_i rows."""
    from model.builder import build_vlm
    from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig

    vlm, tokenizer = build_vlm(
        LanguageModelConfig(language_model=str(tiny_qwen_dir), dtype="float32"),
        VisionConfig(vision_model=str(tiny_clip_dir)),
        ProjectorConfig(),
    )
    counts_of = _SizeDependent()
    seen = []

    def image_rows(features, image_sizes):  # [n_img, N', Dl], [n_img, 2] -> [total_rows, Dl]
        seen.append(image_sizes)
        counts = [counts_of.num_image_tokens(tuple(size)) for size in image_sizes.tolist()]
        return torch.cat([rows[:count] for rows, count in zip(features, counts, strict=True)])

    monkeypatch.setattr(vlm, "image_rows", image_rows)
    processor = VLMProcessor(tokenizer, vlm.image_token_id, _SizeDependent())
    # pixels from the tower's own preprocessing (one [3, H, W] per image), counts from the fake
    tower_side = VLMProcessor(tokenizer, vlm.image_token_id, vlm.vision.image_processor)
    pixels_of = tower_side.image_inputs
    images = [Image.new("RGB", size) for size in [(7, 3), (2, 9), (12, 12)]]
    conversations = [
        (["<image>\n<image>\nsame?", "no"], images[:2]),
        (["<image>\nhi", "a"], images[2:]),
    ]
    samples = []
    for contents, pictures in conversations:
        inputs = pixels_of(pictures)
        encoded = processor.encode(["user", "assistant"], contents, inputs["image_sizes"])
        samples.append({"input_ids": torch.tensor(encoded.input_ids),
                        "labels": torch.tensor(encoded.labels), **inputs})  # fmt: skip
    batch = SupervisedCollator(tokenizer.pad_token_id)(samples)
    assert batch["image_sizes"].tolist() == [[3, 7], [9, 2], [12, 12]]
    assert torch.isfinite(vlm(**batch).loss)
    assert seen[-1] is batch["image_sizes"]
    grown = batch["image_sizes"] + torch.tensor([[0, 0], [0, 0], [1, 0]])  # 5+7+3 -> 5+7+4
    with pytest.raises(ValueError, match="15 placeholder positions .* 16 image feature rows"):
        vlm(**{**batch, "image_sizes": grown})


def test_a_size_dependent_tower_gets_no_feature_cache(tiny_clip_dir, tmp_path, monkeypatch):
    from visual import load_vision_tower
    from visual.feature_cache import encode_feature_cache
    from visual.tower import VisionTower

    tower = load_vision_tower(str(tiny_clip_dir))
    monkeypatch.setattr(VisionTower, "image_processor", property(lambda self: _SizeDependent()))
    with pytest.raises(ValueError, match="size-dependent"):
        encode_feature_cache(tower, ["a.png"], tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
