"""The shipped example build's output goes straight into train.py and test.py."""

from __future__ import annotations

import json
from pathlib import Path

import train
from dataprocess.build import build
from dataprocess.config import load_config as load_build_config

REPO = Path(__file__).resolve().parent.parent


def test_example_build_output_trains(tmp_path, tiny_qwen_dir, tiny_clip_dir):
    config = load_build_config(REPO / "dataprocess" / "config.yaml")
    output = tmp_path / "chat.json"
    report = build(config, output=output, workers=2)
    records = json.loads(output.read_text(encoding="utf-8"))
    assert records and report["output"] == str(output)
    assert any("image" not in r for r in records) and any("image" in r for r in records)

    out_dir = tmp_path / "run"
    train.main(
        [
            "--config", str(REPO / "configs" / "demo.yaml"),
            "--language_model", str(tiny_qwen_dir),
            "--vision_model", str(tiny_clip_dir),
            "--data_path", str(output),
            "--image_folder", str(config.image_root),
            "--output_dir", str(out_dir),
            "--per_device_train_batch_size", "4",
            "--max_steps", "2",
            "--save_steps", "1000",
            "--report_to", "none",
            "--dataloader_num_workers", "0",
        ]
    )  # fmt: skip
    saved = json.loads((out_dir / "vlm_config.json").read_text())
    assert saved["weights"] == ["projector.safetensors", "adapter"]
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
