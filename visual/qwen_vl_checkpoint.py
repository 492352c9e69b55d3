"""Qwen-VL's visual encoder in a released checkpoint: its config, and reading only its tensors.

A Qwen-VL / Qwen-VL-Chat directory as released holds `config.json` (whose `visual` section sizes
the encoder) and the weights, sharded (`*.bin` or `*.safetensors` plus their `.index.json`) or in
one file. The encoder's 594 tensors are `transformer.visual.*`; only the shards that hold them
are opened, and only those tensors are read (safetensors: one `get_tensor` per visual name;
`.bin`: a memory-mapped, weights-only `torch.load`, so the LM tensors of a shared shard are
mapped, never copied). No remote code runs. A tower extracted by `python -m visual.qwen_vl
extract` has the same layout, reduced to `config.json` and one `model.safetensors` with the same
tensor names and dtype, so one reader serves both. The network is in `visual/qwen_vl_tower.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PREFIX = "transformer.visual."
CONFIG_FILE = "config.json"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
POSITION_TABLE_ROWS = 256  # the ViT's position table is 16x16 whatever the image size (visual.py)
POOL_HEAD_DIM = 128  # resampler heads = output_dim // 128 (visual.py), not `heads`


@dataclass(frozen=True)
class QwenVLVisualConfig:
    """The `visual` section of a Qwen-VL config.json (Qwen-VL-Chat: 448, 14, 1664, 48, 16,
    4.9231, 4096). `n_queries` is not in the released config: visual.py's default is 256."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    n_queries: int = 256

    @property
    def grid(self) -> int:
        """Patches per side: 32 at 448 px."""
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # int(1664 * 4.9231) = 8192

    @property
    def pool_heads(self) -> int:
        return self.output_dim // POOL_HEAD_DIM

    @classmethod
    def from_dict(cls, visual: Mapping[str, Any], source: str) -> QwenVLVisualConfig:
        """Read the section; other keys (image_start_id) belong to the LM and are ignored."""
        values: dict[str, Any] = {}
        for key, kind in (
            ("image_size", int),
            ("patch_size", int),
            ("width", int),
            ("layers", int),
            ("heads", int),
            ("mlp_ratio", float),
            ("output_dim", int),
            ("n_queries", int),
        ):
            if key not in visual:
                if key == "n_queries":
                    continue
                raise ValueError(f"{source}: the 'visual' section has no {key!r}")
            value = visual[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{source}: visual.{key} must be a positive number, got {value!r}")
            if kind is int and value != int(value):
                raise ValueError(f"{source}: visual.{key} must be an integer, got {value!r}")
            values[key] = kind(value)
        config = cls(**values)
        config.check(source)
        return config

    def check(self, source: str) -> None:
        """Geometry the network needs; raise ValueError naming `source` and the value."""
        problems = []
        if self.image_size < self.patch_size:
            problems.append(f"image_size {self.image_size} < patch_size {self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool_heads < 1 or self.output_dim % self.pool_heads:
            problems.append(f"output_dim {self.output_dim} needs >= 1 head of {POOL_HEAD_DIM}")
        if int(self.n_queries**0.5) ** 2 != self.n_queries:
            problems.append(f"n_queries {self.n_queries} is not a square")
        if problems:
            raise ValueError(f"{source}: unsupported visual config: " + "; ".join(problems))


def read_visual_config(path: Path) -> tuple[QwenVLVisualConfig, dict[str, Any]]:
    """(parsed config, the raw `visual` section) of a Qwen-VL or extracted-tower directory."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_FILE}; expected a Qwen-VL / Qwen-VL-Chat checkpoint directory "
            "or a tower made by `python -m visual.qwen_vl extract`"
        )
    data = _read_json(file)
    visual = data.get("visual") if isinstance(data, dict) else None
    if not isinstance(visual, dict):
        raise ValueError(
            f"{file}: no 'visual' section, so this is not a Qwen-VL checkpoint (Qwen-VL and "
            "Qwen-VL-Chat configs size their visual encoder there)"
        )
    return QwenVLVisualConfig.from_dict(visual, str(file)), visual


def checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local directory as given; otherwise a hub repo id ("Qwen/Qwen-VL-Chat"), of which only
    config.json, the index and the shards holding visual tensors are fetched (or found in the
    cache when offline)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path}: not a directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = str(name_or_path)
    try:
        root = Path(hf_hub_download(repo, CONFIG_FILE)).parent
        for index_name in INDEX_FILES:
            try:
                index = Path(hf_hub_download(repo, index_name))
            except EntryNotFoundError:
                continue
            shards = {
                f
                for n, f in _read_json(index).get("weight_map", {}).items()
                if n.startswith(PREFIX)
            }
            for shard in sorted(shards):
                hf_hub_download(repo, shard)
            return root
        for name in SINGLE_FILES:
            try:
                hf_hub_download(repo, name)
                return root
            except EntryNotFoundError:
                continue
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name_or_path}: not a local directory, and not a hub repo that can be fetched "
            f"here ({type(error).__name__})"
        ) from None
    raise FileNotFoundError(f"{name_or_path}: the hub repo has no weights files")


def visual_weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Weight file -> the visual tensor names it holds (None: unknown until it is opened).

    With an index, only the shards that its weight_map names for a visual tensor, each checked to
    exist before anything is read; without one, the single weights file.
    """
    for index_name in INDEX_FILES:
        index = path / index_name
        if not index.is_file():
            continue
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            if name.startswith(PREFIX):
                files.setdefault(path / file, []).append(name)
        if not files:
            raise ValueError(f"{index}: lists no {PREFIX}* tensors (no visual encoder)")
        for file, names in files.items():
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file}: listed in {index.name} as holding {names[0]} and "
                    f"{len(names) - 1} more visual tensors, but missing"
                )
        return dict(files)
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return {path / name: None}
    raise FileNotFoundError(
        f"{path}: no weights ({', '.join(INDEX_FILES + SINGLE_FILES)}) next to {CONFIG_FILE}"
    )


def read_visual_tensors(
    path: Path, expected: Mapping[str, tuple[int, ...]], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The visual tensors of `path` under their module names (prefix removed), cast to `dtype`
    (None keeps the stored one), after checking that the names and shapes are exactly `expected`.

    Raises ValueError / FileNotFoundError naming the file and the tensor; nothing half-read is
    returned. Tensors of other models in the same files are counted in a log line, not errors.
    """
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    others = 0
    files = visual_weight_files(path)
    for file, names in files.items():
        read = _read_safetensors if file.name.endswith(".safetensors") else _read_torch_file
        found, skipped = read(file, names)
        others += skipped
        for name, tensor in found.items():
            state[name[len(PREFIX) :]], origin[name[len(PREFIX) :]] = tensor, file
    searched = ", ".join(file.name for file in files)
    _check_names_and_shapes(state, origin, expected, f"{path} ({searched})")
    if others:
        logger.info(
            "%s: loaded the %d %s* tensors; %d other tensors in the same files (the language "
            "model) were not loaded",
            path,
            len(state),
            PREFIX,
            others,
        )
    # A copy in every case: the tower must not depend on a memory-mapped file staying unchanged.
    # Popping frees each original as soon as it is copied, so memory peaks at one extra tensor.
    copies = {}
    for name in list(state):
        tensor = state.pop(name)
        copies[name] = tensor.to(dtype=dtype or tensor.dtype, copy=True)
    return copies


def _read_safetensors(file: Path, names: list[str] | None) -> tuple[dict[str, torch.Tensor], int]:
    """(the visual tensors, how many other tensors the file holds); reads only the former."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            wanted = names if names is not None else sorted(k for k in keys if k.startswith(PREFIX))
            _check_listed(file, wanted, keys)
            found = {name: handle.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: damaged or not a safetensors file ({error})") from None
    return found, len(keys - set(wanted))


def _read_torch_file(file: Path, names: list[str] | None) -> tuple[dict[str, torch.Tensor], int]:
    """As `_read_safetensors`; memory-mapped, so the other tensors are never read into memory
    (a file in torch's pre-1.6 format cannot be mapped and is read whole)."""
    try:
        try:
            data = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:
            if "mmap can only be used" not in str(error):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged pickle or zip
        raise ValueError(f"{file}: damaged or not a PyTorch weights file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: holds a {type(data).__name__}, not a dict of tensors")
    keys = set(data)
    wanted = names if names is not None else sorted(k for k in keys if k.startswith(PREFIX))
    _check_listed(file, wanted, keys)
    return {name: data[name] for name in wanted}, len(keys - set(wanted))


def _check_listed(file: Path, wanted: list[str], keys: set[str]) -> None:
    missing = [name for name in wanted if name not in keys]
    if missing:
        raise ValueError(
            f"{file}: the index lists {missing[0]} in this file, but it is not there"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )


def _check_names_and_shapes(
    state: Mapping[str, torch.Tensor],
    origin: Mapping[str, Path],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    wrong = [
        name for name in expected if name in state and tuple(state[name].shape) != expected[name]
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {PREFIX}{missing[0]}"
            + (f" and {len(missing) - 1} more" if missing[1:] else "")
        )
    if unexpected:
        name = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if unexpected[1:] else ""
        problems.append(f"{origin[name].name}: unexpected tensor {PREFIX}{name}{more}")
    for name in wrong[:3]:
        problems.append(
            f"{origin[name].name}: {PREFIX}{name} has shape {list(state[name].shape)}, "
            f"config.json implies {list(expected[name])}"
        )
    if wrong[3:]:
        problems.append(f"{len(wrong) - 3} more tensors of other shapes")
    if problems:
        raise ValueError(
            f"{source}: not the visual encoder its config.json describes: " + "; ".join(problems)
        )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
