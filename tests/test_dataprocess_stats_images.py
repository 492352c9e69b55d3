"""Token-length statistics (stand-in and real tokenizer) and the image resize cache."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dataprocess.__main__ import main
from dataprocess.process_image import expand_to_square, process_images, resize_image
from dataprocess.schema import Record, Turn
from dataprocess.stats import percentile, record_length, run_stats, summarize


def test_record_length_is_the_training_rendering(tokenizer) -> None:
    from dataset.conversation import encode_conversation

    record = Record("r", ("a.jpg",), (Turn("user", "<image>\nQ"), Turn("assistant", "AB")))
    encoded = encode_conversation(
        tokenizer, ["user", "assistant"], ["<image>\nQ", "AB"],
        image_token_id=151646, num_image_tokens=576, system_prompt="S",
    )  # fmt: skip
    assert record_length(record, tokenizer, 576, system="S") == len(encoded.input_ids)
    assert record_length(record, tokenizer, 729, system="S") == len(encoded.input_ids) + 153


def test_summary_and_histogram(tmp_path: Path, tokenizer) -> None:
    lengths = list(range(1, 101))
    summary = summarize(lengths, model_max_length=90)
    assert (summary["p50"], summary["p90"], summary["p99"], summary["max"]) == (50, 90, 99, 100)
    assert summary["over_model_max_length"] == 10
    assert summary["suggested_model_max_length"] == 512
    assert percentile([], 50) == 0
    data = tmp_path / "chat.json"
    data.write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "image": "a.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nHi"},
                        {"from": "gpt", "value": "Yo"},
                    ],
                },
                {
                    "id": "2",
                    "conversations": [
                        {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Yo"},
                    ],
                },
            ]
        ),
        encoding="utf-8",
    )
    result = run_stats(data, 576, tmp_path / "h.png", 580, system="", tokenizer=tokenizer)
    assert result["max"] - result["min"] >= 576  # the image (and its "\n")
    assert result["over_model_max_length"] == 1
    with Image.open(tmp_path / "h.png") as png:
        assert png.format == "PNG" and png.width > 100


def test_record_length_with_real_qwen_tokenizer(tmp_path: Path, capsys, tokenizer) -> None:
    import qwen

    record = Record("r", (), (Turn("user", "What is 12 + 30?"), Turn("assistant", "It is 42.")))
    _, context = qwen.make_context(
        tokenizer, "What is 12 + 30?", system="You are a helpful assistant."
    )
    # make_context stops after "<|im_start|>assistant\n"; training adds the answer and <|im_end|>.
    expected = len(context) + len(tokenizer.encode("It is 42.")) + 1
    assert record_length(record, tokenizer, 576, system="You are a helpful assistant.") == expected
    data = tmp_path / "chat.json"
    data.write_text(
        json.dumps(
            [
                {
                    "id": "r",
                    "conversations": [
                        {"from": "human", "value": "What is 12 + 30?"},
                        {"from": "gpt", "value": "It is 42."},
                    ],
                }
            ]
        )
    )
    assert main(["stats", "--data", str(data), "--num_image_tokens", "576"]) == 0
    assert json.loads(capsys.readouterr().out)["max"] == expected
    assert (tmp_path / "chat.lengths.png").is_file()


def test_pad_and_resize_geometry() -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(wide, (0, 0, 255))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (0, 0, 255) and square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((20, 9)) != (255, 0, 0) and square.getpixel((20, 10)) == (255, 0, 0)
    assert resize_image(wide, 10, pad_color=(0, 0, 0)).size == (10, 10)
    assert resize_image(wide, 10, pad_color=None).size == (20, 10)  # shorter side to 10


def test_process_images_resumable_and_lists_corrupt(tmp_path: Path, capsys) -> None:
    root, cache = tmp_path / "img", tmp_path / "cache"
    (root / "coco").mkdir(parents=True)
    Image.new("RGB", (64, 32)).save(root / "coco" / "a.jpg")
    Image.new("P", (30, 60)).save(root / "coco" / "b.gif")
    (root / "coco" / "bad.jpg").write_bytes(b"not an image")
    records = [
        {
            "id": str(i),
            "image": f"coco/{name}",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        }
        for i, name in enumerate(["a.jpg", "b.gif", "bad.jpg", "a.jpg"])
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    first = process_images(data, root, cache, size=16, pad_color=(1, 2, 3), workers=2)
    assert (first["resized"], first["skipped_existing"], first["corrupt"]) == (2, 0, 1)
    with Image.open(cache / "coco" / "a.jpg") as image:
        assert (image.size, image.format) == ((16, 16), "JPEG")
    with Image.open(cache / "coco" / "b.gif") as image:
        assert (image.size, image.mode) == ((16, 16), "RGB")
    assert "coco/bad.jpg" in (cache / "corrupt.txt").read_text(encoding="utf-8")
    args = [
        "images",
        "--data",
        str(data),
        "--image_folder",
        str(root),
        "--cache",
        str(cache),
        "--size",
        "16",
    ]
    assert main(args) == 0  # a second run resumes: nothing left to resize
    again = json.loads(capsys.readouterr().out)
    assert (again["resized"], again["skipped_existing"], again["corrupt"]) == (0, 2, 1)
