"""build: the shipped example config end to end, sampling, ids, determinism and exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataprocess.__main__ import main
from dataprocess.build import build, sample_records
from dataprocess.config import ConfigError, SourceConfig, load_config
from dataprocess.reading import iter_raw_records
from dataprocess.schema import Record, Turn, parse_record

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "dataprocess" / "config.yaml"


def test_example_config_builds_end_to_end(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out" / "chat.json"
    assert main(["build", "--config", str(EXAMPLE_CONFIG), "--output", str(output)]) == 0
    records = [
        parse_record(raw, source=str(output), index=i) for i, raw in iter_raw_records(output)
    ]
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 16
    # The same image id in two LLaVA sources and twice in one source: every sample is kept.
    assert {
        "llava_instruct_000000318219",
        "llava_instruct_000000318219_dup1",
        "llava_instruct_zh_000000318219",
    } <= set(ids)
    by_id = {r.id: r for r in records}
    assert by_id["mix665k_0316015849"].images == ("ocr_vqa/images/0316015849.gif",)
    assert by_id["qwenvl_identity_1"].images == (
        "coco/train2017/000000318219.jpg",
        "aic/3a9c41d7e2b0f8c6a1d5e9f0b7c3a2d4e6f81b90.jpg",
    )
    assert by_id["sharegpt_t9WmZr2_0"].turns[0] == Turn("system", "You are a concise assistant.")
    assert sum(i.startswith("aic_") for i in ids) == 4  # 5 captions, one empty
    assert sum(i.startswith("coco_cap_") for i in ids) == 2  # random 2 of 3
    # Newlines inside answers survive the whole pipeline.
    assert (
        by_id["llava_instruct_000000318219"]
        .turns[1]
        .content.endswith("rectangle.\nNothing else is visible.")
    )
    image_root = ROOT / "dataprocess" / "examples" / "images"
    assert all((image_root / p).is_file() for r in records for p in r.images)
    report = json.loads((tmp_path / "out" / "chat.report.json").read_text(encoding="utf-8"))
    assert report["ok"] and report["written"] == 16 and report["dropped"] == 0
    assert report["sources"]["sharegpt"]["changes"]["dropped_leading_assistant_turn"][
        "examples"
    ] == ["t9WmZr2_0"]
    assert "status: OK" in capsys.readouterr().out


def test_build_is_deterministic_and_jsonl_matches_json(tmp_path: Path) -> None:
    config = load_config(EXAMPLE_CONFIG)
    build(config, output=tmp_path / "a.json")
    build(config, output=tmp_path / "b.json")
    build(config, output=tmp_path / "c.jsonl")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert [r for _, r in iter_raw_records(tmp_path / "a.json")] == [
        r for _, r in iter_raw_records(tmp_path / "c.jsonl")
    ]


def _copy_example(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "dataprocess" / "examples", tmp_path / "examples")
    config = tmp_path / "config.yaml"
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8").replace("../outputs/data/example/", "out/")
    config.write_text(text, encoding="utf-8")
    return config


def test_errors_fail_the_build_unless_drop_invalid(tmp_path: Path) -> None:
    config = _copy_example(tmp_path)
    (
        tmp_path / "examples" / "images" / "aic" / "3a9c41d7e2b0f8c6a1d5e9f0b7c3a2d4e6f81b90.jpg"
    ).unlink()
    output = tmp_path / "out" / "chat.json"
    assert main(["build", "--config", str(config)]) == 1
    assert not output.exists()
    report = json.loads((tmp_path / "out" / "chat.report.json").read_text(encoding="utf-8"))
    assert report["sources"]["aic"]["errors"]["missing_image"]["count"] == 4
    assert report["sources"]["qwenvl"]["errors"]["missing_image"]["examples"] == [
        "qwenvl_identity_1"
    ]
    assert main(["build", "--config", str(config), "--drop-invalid"]) == 0
    ids = [raw["id"] for _, raw in iter_raw_records(output)]
    assert len(ids) == 16 - 5 and not any(i.startswith("aic_") for i in ids)
    dropped = (tmp_path / "out" / "chat.dropped.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(dropped) == 5
    assert main(["build", "--config", str(config), "--skip-image-check"]) == 0


def _records(n: int) -> list[Record]:
    return [Record(str(i), (), (Turn("user", "q"), Turn("assistant", "a"))) for i in range(n)]


def test_sampling_modes() -> None:
    def source(**kw: object) -> SourceConfig:
        return SourceConfig(name="s", format="llava", paths=(), **kw)  # type: ignore[arg-type]

    records = _records(10)
    assert sample_records(records, source()) == records
    assert [r.id for r in sample_records(records, source(sample="first", n=3))] == ["0", "1", "2"]
    picked = sample_records(records, source(sample="random", n=4, seed=1))
    assert len(picked) == 4 and picked == sorted(picked, key=lambda r: int(r.id))
    assert picked == sample_records(records, source(sample="random", n=4, seed=1))
    assert picked != sample_records(records, source(sample="random", n=4, seed=2))
    assert sample_records(records, source(sample="random", n=40)) == records


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "image_root: i\noutput: o.json\nsources:\n  - {name: a, format: tsv, path: x}\n",
            "allowed: llava",
        ),
        ("image_root: i\noutput: o.json\nsources:\n  - {name: a, format: llava}\n", "'path'"),
        (
            "image_root: i\noutput: o.json\nsources:\n  - {name: a, format: llava, path: x, sample: first}\n",
            "'n'",
        ),
        (
            "image_root: i\noutput: o.json\nsources:\n  - {name: a, format: llava, path: x, colour: 1}\n",
            "colour",
        ),
        (
            "image_root: i\noutput: o.json\nsources:\n  - {name: a, format: llava, path: x}\n  - {name: a, format: llava, path: y}\n",
            "unique",
        ),
        ("output: o.json\nsources: []\n", "image_root"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=words) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_paths_resolve_against_the_config_file() -> None:
    config = load_config(EXAMPLE_CONFIG)
    assert config.image_root == (ROOT / "dataprocess" / "examples" / "images").resolve()
    assert config.sources[0].paths == (
        (ROOT / "dataprocess" / "examples" / "llava_instruct.json").resolve(),
    )


def test_cli_bad_config_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["build", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_package_is_torch_free() -> None:
    code = (
        "import sys, dataprocess, dataprocess.__main__, dataprocess.build, dataprocess.validate, "
        "dataprocess.process_image, dataprocess.stats; assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_dropped_list_names_each_errors_own_source(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "1", "conversations": []}\n', encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        "image_root: .\noutput: chat.json\nsources:\n"
        "  - {name: a, format: llava, path: broken.jsonl}\n"
        "  - {name: b, format: llava, path: broken.jsonl}\n",
        encoding="utf-8",
    )
    report = build(load_config(config), drop_invalid=True)
    lines = Path(report["dropped_list"]).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["source"] for line in lines] == ["a", "b"]
