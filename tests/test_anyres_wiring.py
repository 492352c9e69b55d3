"""AnyRes through the processor seam: a built anyres VLM hands out the real AnyRes image processor,
its tiles go through the tower and projector and `image_rows` packs them, and over records of
random sizes (truncated, collated, packed) the placeholder ids always equal the packed rows."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from dataset.collator import SupervisedCollator
from dataset.packing import PackedCollator, PackedDataset
from dataset.processor import VLMProcessor
from model.anyres import AnyResProjector
from tests.test_processor_seam import _build, _records
from visual.anyres import AnyResImageProcessor, default_pinpoints


def _anyres_vlm(qwen_dir, tower_dir, **vision):
    from model.builder import build_vlm
    from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig

    torch.manual_seed(0)
    return build_vlm(
        LanguageModelConfig(language_model=str(qwen_dir), dtype="float32"),
        VisionConfig(vision_model=str(tower_dir), image_aspect_ratio="anyres", **vision),
        ProjectorConfig(),
    )


@pytest.fixture(scope="module")
def anyres_vlm(tiny_qwen_dir, tiny_clip_dir):
    return _anyres_vlm(tiny_qwen_dir, tiny_clip_dir)


def test_an_anyres_vlm_hands_out_the_tiling_and_its_projector(anyres_vlm, tiny_qwen_dir, tmp_path):
    from demo.tiny_towers import save_tiny_siglip_tower

    vlm, _ = anyres_vlm
    assert isinstance(vlm.projector, AnyResProjector)
    processor = vlm.image_processor
    assert isinstance(processor, AnyResImageProcessor) and processor.fixed_num_image_tokens is None
    assert processor.geometry.pinpoints == tuple(default_pinpoints(32))
    assert processor.geometry.base_tokens == vlm.vision.num_image_tokens == 16  # CLS dropped
    siglip, _ = _anyres_vlm(
        tiny_qwen_dir, save_tiny_siglip_tower(tmp_path / "siglip", 32, 8),
        image_grid_pinpoints=[[32, 64], [64, 64]], image_max_tiles=2,
    )  # fmt: skip
    assert siglip.image_processor.geometry.pinpoints == ((32, 64),)  # 2x2 is over the cap
    assert siglip.image_processor.geometry.base_tokens == 16  # SigLIP has no CLS to drop


def test_tiles_pack_into_as_many_rows_as_placeholders_and_train_the_newline(anyres_vlm, tokenizer):
    vlm, _ = anyres_vlm
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    sizes = [(10, 70), (70, 10), (100, 60), (32, 32), (1, 3)]  # (width, height) for PIL
    images = [Image.new("RGB", size, (i * 40, 9, 90)) for i, size in enumerate(sizes)]
    inputs = processor.image_inputs(images)
    tiles = sum(vlm.image_processor.geometry.num_tiles((h, w)) for w, h in sizes)
    assert inputs["pixel_values"].shape == (tiles, 3, 32, 32)  # all tiles, image after image
    contents = ["<image>\n" * 3 + "what?", "this", "<image>\n<image>\nand?", "that"]
    encoded = processor.encode(["user", "assistant"] * 2, contents, inputs["image_sizes"])
    ids = torch.tensor([encoded.input_ids])  # [1, L]
    rows = vlm.image_rows(vlm.encode_images(inputs["pixel_values"]), inputs["image_sizes"])
    counts = processor.image_token_counts(inputs["image_sizes"])
    assert rows.shape[0] == int((ids == vlm.image_token_id).sum()) == sum(counts)
    vlm.train()
    loss = vlm(ids, labels=torch.tensor([encoded.labels]), **inputs).loss
    loss.backward()
    assert vlm.projector.image_newline.grad.abs().sum() > 0
    vlm.zero_grad()
    with pytest.raises(ValueError, match="needs image_sizes"):
        vlm(ids, pixel_values=inputs["pixel_values"])
    wrong = inputs["image_sizes"].clone()
    wrong[2] = torch.tensor([32, 32])  # 2x2 tiles read as 1x2: other tiles, other rows
    with pytest.raises(ValueError, match="image_sizes .* need .* tiles"):
        vlm(ids, pixel_values=inputs["pixel_values"], image_sizes=wrong)


def test_a_text_only_training_batch_keeps_the_newline_in_the_graph(anyres_vlm, tokenizer):
    vlm, _ = anyres_vlm
    vlm.train()
    ids = torch.tensor([tokenizer.encode("no image here")])
    vlm(ids, labels=ids).loss.backward()
    assert vlm.projector.image_newline.grad is not None  # zero, but there: DDP sees it used
    vlm.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_placeholders_equal_anyres_rows_under_truncation_and_packing(
    anyres_vlm, tokenizer, tmp_path, seed
):
    vlm, _ = anyres_vlm
    vlm.eval()
    rng = random.Random(seed)
    records = _records(tmp_path, 24, rng)  # 0-3 images of 1..40 px per side, random sizes
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    dataset = _build(tmp_path, tokenizer, max_length=200, processor=processor)
    assert len(dataset) > 0 and max(dataset.lengths) <= 200
    assert len(dataset) < len(records) or any(dataset.samples["truncated"])  # the limit cut
    collator = SupervisedCollator(pad_token_id=tokenizer.pad_token_id)
    batches = [collator([dataset[i] for i in range(s, min(s + 5, len(dataset)))])
               for s in range(0, len(dataset), 5)]  # fmt: skip
    packed = PackedDataset(dataset, capacity=200)
    batches += [PackedCollator(collator)([packed[i]]) for i in range(len(packed))]
    with torch.no_grad():
        for batch in batches:
            placeholders = int((batch["input_ids"] == vlm.image_token_id).sum())
            if "pixel_values" in batch:
                rows = vlm.image_rows(
                    vlm.encode_images(batch["pixel_values"]), batch["image_sizes"]
                )
                assert rows.shape[0] == placeholders
            else:
                assert placeholders == 0
            assert torch.isfinite(vlm(**batch).loss)  # the splice checks the counts again


def test_a_record_whose_anyres_images_alone_exceed_the_length_is_refused(
    anyres_vlm, tokenizer, tmp_path
):
    vlm, _ = anyres_vlm
    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")  # 2x2 tiles: 64 + 8 + 16
    records = [{"id": "too-big", "image": "big.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a"}]}]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    assert processor.image_token_counts([(64, 64)]) == [88]
    with pytest.raises(ValueError, match=r"record 'too-big' .*images alone take 88 tokens"):
        _build(tmp_path, tokenizer, max_length=80, processor=processor)


def test_an_anyres_run_refuses_the_feature_cache(anyres_vlm, tmp_path):
    from runtime.config import DataConfig
    from runtime.data import build_datasets

    vlm, tokenizer = anyres_vlm
    config = DataConfig(data_path=str(tmp_path / "d.json"), image_folder=str(tmp_path),
                        feature_cache=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(
        ValueError, match="--feature_cache stores one fixed .* AnyResImageProcessor"
    ):
        build_datasets(config, vlm, tokenizer)


def test_stats_count_anyres_records_by_image_size_as_training_does(
    anyres_vlm, tokenizer, tiny_clip_dir, tmp_path, capsys
):
    from dataprocess.__main__ import main as dataprocess_main

    vlm, _ = anyres_vlm
    records = _records(tmp_path, 12, random.Random(5))
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    lengths = sorted(_build(tmp_path, tokenizer, max_length=4096, processor=processor).lengths)
    sizes = [Image.open(tmp_path / name).size for r in records for name in r.get("image", [])]
    counts = processor.image_token_counts([(h, w) for w, h in sizes])
    argv = ["stats", "--data", str(tmp_path / "data.json"), "--vision_model", str(tiny_clip_dir),
            "--image_aspect_ratio", "anyres", "--image_folder", str(tmp_path),
            "--system", "You are a helpful assistant."]  # fmt: skip
    assert dataprocess_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["min"], summary["max"]) == (lengths[0], lengths[-1])
    by_tokens = summary["image_tokens"]["images_by_tokens"]
    assert by_tokens == {str(t): counts.count(t) for t in sorted(set(counts))}
    assert len(by_tokens) > 1  # the sizes really give several counts
    capped = argv + ["--image_max_tiles", "2", "--image_grid_pinpoints", "[[32, 64], [64, 64]]"]
    assert dataprocess_main(capped) == 0
    # only 1x2 tiles are left: 4 x 8 features, 4 newlines, the base tile's 16
    assert json.loads(capsys.readouterr().out)["image_tokens"]["max"] == 16 + 4 * 8 + 4
    no_anyres = ["stats", "--data", str(tmp_path / "data.json"), "--image_max_tiles", "2",
                 "--vision_model", str(tiny_clip_dir)]  # fmt: skip
    assert dataprocess_main(no_anyres) == 2
    assert "--image_max_tiles applies to --image_aspect_ratio anyres" in capsys.readouterr().err
