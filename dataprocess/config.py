"""The build config: which sources to read, where they live and how to sample and merge them.

One YAML file (see ``dataprocess/config.yaml``) maps onto :class:`BuildConfig`. Relative paths
are resolved against the directory of the config file, so a config can move with its data.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dataprocess.boxes import BOX_FORMATS


def list_flag(text: str) -> list:
    """A list-valued command-line flag in YAML (or JSON) flow syntax, e.g. `[[336, 672]]`: the one
    parser of train.py's, `dataprocess stats`' and the benchmarks' list flags."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a list such as [[336, 672]], got {text!r}")
    return value


# Preference sets (dataprocess/sources/preference.py): they give preference records, for DPO
PREFERENCE_FORMATS = ("rlaif_v", "vlfeedback", "llava_rlhf")
FORMATS = ("llava", "qwen_vl", "aic_captions", "coco_captions", "sharegpt", *PREFERENCE_FORMATS)
SAMPLE_MODES = ("all", "first", "random")
BOX_SOURCES = ("llava", "qwen_vl")  # the formats whose text holds boxes
DEFAULT_PROMPTS = {
    "aic_captions": ["这幅图像描述了什么？", "请用一句话描述这张图片。", "图中有什么？"],
    "coco_captions": [
        "Describe the image briefly.",
        "Write a short caption for this image.",
        "What does this picture show? Answer in one sentence.",
    ],
}


class ConfigError(ValueError):
    """The config file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class SourceConfig:
    """One input corpus and how to convert and sample it."""

    name: str  # id prefix, unique across sources
    format: str  # one of FORMATS
    paths: tuple[Path, ...]  # annotation files, absolute
    image_prefix: str = ""  # prepended to the source's image paths (relative to image_root)
    sample: str = "all"  # one of SAMPLE_MODES
    n: int | None = None  # how many records for sample "first" / "random"
    seed: int = 0  # for sample "random" and for prompt choice
    prompts: tuple[str, ...] = ()  # caption sources: instructions drawn per record
    join_lines: bool = False  # caption sources: replace newlines inside a caption by a space
    box_format: str = "keep"  # llava / qwen_vl sources: rewrite boxes (dataprocess.boxes)


@dataclass(frozen=True)
class BuildConfig:
    """The whole build: sources, image root, output and merge options."""

    sources: tuple[SourceConfig, ...]
    image_root: Path
    output: Path
    seed: int = 0
    shuffle: bool = True
    check_images: bool = True
    config_path: Path | None = None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _require(mapping: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key!r} must be {kind}, got {value!r}")
    return value


def _parse_sample(raw: dict, where: str) -> tuple[str, int | None, int]:
    sample = raw.get("sample", "all")
    seed = raw.get("seed", 0)
    if isinstance(sample, dict):
        mode, n, seed = sample.get("mode", "all"), sample.get("n"), sample.get("seed", seed)
    else:
        mode, n = sample, raw.get("n")
    if mode not in SAMPLE_MODES:
        raise ConfigError(f"{where}: sample mode {mode!r}; allowed: {', '.join(SAMPLE_MODES)}")
    if mode != "all" and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ConfigError(f"{where}: sample mode {mode!r} needs a non-negative integer 'n'")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: 'seed' must be an integer, got {seed!r}")
    return mode, (n if mode != "all" else None), seed


def _parse_source(raw: Any, base: Path, where: str) -> SourceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each source must be a mapping")
    name = _require(raw, "name", where, str)
    where = f"{where} ({name})"
    fmt = _require(raw, "format", where, str)
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path_value = _require(raw, "path", where, (str, list))
    path_list = [path_value] if isinstance(path_value, str) else path_value
    if not path_list or not all(isinstance(p, str) for p in path_list):
        raise ConfigError(f"{where}: 'path' must be a string or a non-empty list of strings")
    mode, n, seed = _parse_sample(raw, where)
    prompts = raw.get("prompts", DEFAULT_PROMPTS.get(fmt, []))
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"{where}: 'prompts' must be a list of non-empty strings")
    if fmt in DEFAULT_PROMPTS and not prompts:
        raise ConfigError(f"{where}: a caption source needs at least one prompt")
    box_format = raw.get("box_format", "keep")
    if box_format not in BOX_FORMATS:
        raise ConfigError(f"{where}: box_format {box_format!r}; allowed: {', '.join(BOX_FORMATS)}")
    if box_format != "keep" and fmt not in BOX_SOURCES:
        raise ConfigError(f"{where}: box_format applies to {' and '.join(BOX_SOURCES)} sources")
    known = {
        "name",
        "format",
        "path",
        "image_prefix",
        "sample",
        "n",
        "seed",
        "prompts",
        "join_lines",
        "box_format",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    return SourceConfig(
        name=name,
        format=fmt,
        paths=tuple(_resolve(base, p) for p in path_list),
        image_prefix=str(raw.get("image_prefix", "") or ""),
        sample=mode,
        n=n,
        seed=seed,
        prompts=tuple(prompts),
        join_lines=bool(raw.get("join_lines", False)),
        box_format=box_format,
    )


def load_config(path: str | Path) -> BuildConfig:
    """Read and check a build config; relative paths resolve against the file's directory."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = path.parent
    sources_raw = _require(raw, "sources", str(path), list)
    sources = tuple(
        _parse_source(item, base, f"{path}: sources[{i}]") for i, item in enumerate(sources_raw)
    )
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: source names must be unique (they prefix ids): {duplicates}")
    if len({s.format in PREFERENCE_FORMATS for s in sources}) > 1:
        raise ConfigError(
            f"{path}: mixes preference sources ({', '.join(PREFERENCE_FORMATS)}) with training "
            "sources; SFT and DPO read separate files, so build them separately"
        )
    if not isinstance(raw.get("seed", 0), int):
        raise ConfigError(f"{path}: 'seed' must be an integer")
    return BuildConfig(
        sources=sources,
        image_root=_resolve(base, _require(raw, "image_root", str(path), str)),
        output=_resolve(base, _require(raw, "output", str(path), str)),
        seed=raw.get("seed", 0),
        shuffle=bool(raw.get("shuffle", True)),
        check_images=bool(raw.get("check_images", True)),
        config_path=path,
    )
