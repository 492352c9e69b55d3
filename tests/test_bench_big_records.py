"""The large-file benchmarks at a tiny size: the build row runs, and so does train.py's data
preparation as the prep rows run it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import big_pipeline
from bench.big_records import measure, write_data


def test_build_row_writes_every_record(tmp_path: Path) -> None:
    folder, data, _ = write_data(tmp_path, 30)
    config = folder / "build.yaml"
    config.write_text(big_pipeline.BUILD_CONFIG.format(folder=folder, data=data), "utf-8")
    command = [sys.executable, "-m", "dataprocess", "build", "--config", str(config)]
    got = measure(command, big_pipeline.ROOT, log=tmp_path / "build.log")
    assert got["rc"] == 0 and got["max_rss_mib"] > 0
    assert len(json.loads((folder / "built.json").read_text(encoding="utf-8"))) == 30
    assert "status: OK" in (tmp_path / "build.log").read_text(encoding="utf-8")


def test_prepare_data_reaches_the_first_batch(
    tmp_path: Path, tiny_qwen_dir: Path, tiny_clip_dir: Path, capsys
) -> None:
    folder, data, _ = write_data(tmp_path, 30)
    flags = big_pipeline._train_flags(folder, data, tiny_qwen_dir, tiny_clip_dir, tmp_path / "run")
    big_pipeline.prepare_data(flags)
    out = capsys.readouterr().out
    assert "after lengths (30): peak RSS" in out
    assert "after first batch (4, " in out and f"{big_pipeline.ANON} " in out
