"""Frozen-tower feature cache: every image encoded once into a memory-mapped store.

A frozen tower (eval mode, no augmentation, no gradients) maps an image to the same
`[N, Dv]` features in every epoch, so they can be computed once and read back instead of
decoding the image and running the tower each step. A cache directory holds:

- `features.npy`: `[n_images, N, Dv]` float16 or float32, written incrementally as a numpy
  memmap; row i belongs to `index.json["images"][i]`.
- `index.json`: the tower settings the features depend on (library, model, pretrained tag,
  feature layer, aspect ratio, N, Dv, image size, and the fingerprint of its weights, so new
  weights at the same path are not read as the old ones), the storage dtype, and the ordered list of
  image paths (relative to the image folder, as the records spell them).

`encode_feature_cache` writes into `<out>.partial/` and renames it to `<out>` only when complete,
so an interrupted run never leaves a cache that looks finished. `FeatureCache` opens one
read-only; it pickles without its array (reopened lazily), so DataLoader workers share the OS
page cache. `check_matches` refuses a cache made with another tower, naming every difference.
A cache holds one `[N, Dv]` block per image, so it serves fixed-grid image processors only:
`check_fixed_grid` refuses one whose token count depends on the image size (AnyRes tiling).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from identity.fingerprint import module_fingerprint
from visual.image_io import ImageLoadError, load_image
from visual.preprocessing import ImagePreprocessor
from visual.tower import VisionTower

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the tower's weights fingerprint in the settings
FEATURES_FILE, INDEX_FILE = "features.npy", "index.json"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
# Tower settings a cache must agree on with the model that trains from it.
MATCHED_SETTINGS = (
    "library",
    "name_or_path",
    "pretrained",
    "feature_layer",
    "image_aspect_ratio",
    "num_image_tokens",
    "hidden_size",
    "image_size",
    "weights",  # the tower's content (identity.fingerprint): new weights at the same path differ
)


def check_fixed_grid(image_processor: Any) -> None:
    """Refuse, in one line, an image processor whose token count depends on the image size."""
    if getattr(image_processor, "fixed_num_image_tokens", None) is None:
        raise ValueError(
            f"--feature_cache stores one fixed [N, Dv] block per image, but the image processor "
            f"{type(image_processor).__name__} gives a size-dependent number of tokens per "
            "image; train without --feature_cache"
        )


def _normalise_model_name(name: Any) -> Any:
    """A local checkpoint dir compares by its absolute path; a hub id or model name as given."""
    if isinstance(name, str) and Path(name).exists():
        return str(Path(name).resolve())
    return name


def tower_cache_settings(tower: VisionTower) -> dict[str, Any]:
    """What a cache of `tower`'s features depends on (the keys of MATCHED_SETTINGS)."""
    settings = {
        **tower.settings,
        "num_image_tokens": tower.num_image_tokens,
        "hidden_size": tower.hidden_size,
        "image_size": tower.image_size,
        "weights": module_fingerprint(tower)["all"],
    }
    settings["name_or_path"] = _normalise_model_name(settings.get("name_or_path"))
    return {key: settings.get(key) for key in MATCHED_SETTINGS}


class _ImageFiles(torch.utils.data.Dataset):
    """Relative image paths -> (preprocessed `[3, H, W]`, "") or (None, why it does not decode).

    Runs in DataLoader workers: a decoding fault travels back as a value, because an exception
    raised in a worker reaches the user wrapped in that worker's traceback.
    """

    def __init__(self, paths: Sequence[str], folder: Path, preprocess: ImagePreprocessor) -> None:
        self.paths, self.folder, self.preprocess = paths, folder, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        try:
            image = load_image(self.folder / self.paths[index])
        except ImageLoadError as error:
            return None, str(error)
        return self.preprocess([image])[0], ""  # [3, H, W]


def _stack(items: list[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, list[str]]:
    """A batch `[b, 3, H, W]` with no faults, or (None, [why per image]) when any image failed."""
    faults = [why for _, why in items]
    if any(faults):
        return None, faults
    return torch.stack([pixels for pixels, _ in items]), []


def default_workers() -> int:
    """Image-decoding worker processes: up to 4, leaving one core to the main process."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def encode_feature_cache(
    tower: VisionTower,
    image_paths: Iterable[str],
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    dtype: str = "float16",
    num_workers: int = 0,
) -> Path:
    """Encode every distinct image of `image_paths` once with `tower` into a cache at `out_dir`.

    Rows keep the first-seen order of the paths. Raises FileExistsError if `out_dir` exists,
    ValueError for a bad `dtype` / `batch_size` or no images, and `ImageLoadError` naming the
    file for an image that cannot be read, its `image` the path as given (nothing is left at
    `out_dir` then); a tower whose token count depends on the image size is refused.
    """
    check_fixed_grid(tower.image_processor)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    paths = list(dict.fromkeys(image_paths))  # distinct, first-seen order
    if not paths:
        raise ValueError("no images to encode: the records reference none")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"feature cache {out_dir} already exists; remove it or pick --out")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        _write_features(tower, paths, Path(image_folder), staging, batch_size, dtype, num_workers)
        index = {
            "version": CACHE_VERSION,
            "settings": tower_cache_settings(tower),
            "dtype": dtype,
            "encoded_with": {"tower_dtype": str(tower.dtype), "device": str(tower.device)},
            "images": paths,
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, out_dir)
    return out_dir


def _write_features(
    tower: VisionTower,
    paths: list[str],
    folder: Path,
    staging: Path,
    batch_size: int,
    dtype: str,
    num_workers: int,
) -> None:
    """Run the tower over `paths` in order, filling a `[n, N, Dv]` memmap batch by batch."""
    shape = (len(paths), tower.num_image_tokens, tower.hidden_size)
    store = np.lib.format.open_memmap(
        staging / FEATURES_FILE, mode="w+", dtype=STORAGE_DTYPES[dtype], shape=shape
    )
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, folder, tower.preprocessor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_stack,
        pin_memory=tower.device.type == "cuda",
    )
    start, began = 0, time.perf_counter()
    tower.eval()
    with tqdm(total=len(paths), desc="features", unit="img") as progress:
        for pixel_values, faults in loader:  # [b, 3, H, W]
            if faults:
                bad = next(k for k, why in enumerate(faults) if why)
                raise ImageLoadError(faults[bad], image=paths[start + bad])
            features = tower(pixel_values)  # [b, N, Dv], no grad
            end = start + features.shape[0]
            store[start:end] = features.float().cpu().numpy()
            start = end
            progress.update(features.shape[0])
    store.flush()
    del store
    logger.info("encoded %d images in %.1f s", len(paths), time.perf_counter() - began)


class FeatureCache:
    """A read-only feature cache directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a feature cache (no {INDEX_FILE}); write one with "
                "`python -m dataprocess features`"
            )
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"feature cache {self.path} has version {index.get('version')}, this code reads "
                f"{CACHE_VERSION}; rebuild it with `python -m dataprocess features`"
            )
        self.settings: dict[str, Any] = index["settings"]
        self.dtype: str = index["dtype"]
        self.images: list[str] = index["images"]
        self._rows = {image: row for row, image in enumerate(self.images)}
        self._array: np.ndarray | None = None
        expected = (len(self.images), self.num_image_tokens, self.hidden_size)
        if self.array.shape != expected:
            raise ValueError(
                f"feature cache {self.path}: {FEATURES_FILE} has shape {self.array.shape}, "
                f"{INDEX_FILE} says {expected}"
            )

    @property
    def num_image_tokens(self) -> int:
        return int(self.settings["num_image_tokens"])

    @property
    def hidden_size(self) -> int:
        return int(self.settings["hidden_size"])

    @property
    def array(self) -> np.ndarray:
        """The `[n_images, N, Dv]` memmap, opened on first use (also in each worker process)."""
        if self._array is None:
            self._array = np.load(self.path / FEATURES_FILE, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # never pickle the features; each process maps the file itself
        return state

    def __len__(self) -> int:
        return len(self.images)

    def missing(self, paths: Iterable[str]) -> list[str]:
        """The paths of `paths` that have no row here, in order."""
        return [p for p in paths if p not in self._rows]

    def check_matches(self, settings: Mapping[str, Any]) -> None:
        """Raise ValueError naming each setting where this cache and `settings` differ (`weights`:
        the tower's weights changed, or were loaded in another dtype than the cache's).

        `settings` is `tower_cache_settings(tower)` of the model that will read the cache.
        """
        expected = {k: settings.get(k) for k in MATCHED_SETTINGS}
        expected["name_or_path"] = _normalise_model_name(expected["name_or_path"])
        differences = [
            f"{key}: cache {self.settings.get(key)!r} vs model {expected[key]!r}"
            for key in MATCHED_SETTINGS
            if self.settings.get(key) != expected[key]
        ]
        if differences:
            raise ValueError(
                f"feature cache {self.path} was made with another vision tower setup: "
                + "; ".join(differences)
                + " (rebuild it with `python -m dataprocess features`, or drop --feature_cache)"
            )

    def features(self, paths: Sequence[str]) -> torch.Tensor:
        """The cached tower outputs of `paths`, `[len(paths), N, Dv]` in the stored dtype."""
        rows = []
        for path in paths:
            row = self._rows.get(path)
            if row is None:
                raise ValueError(f"image {path!r} is not in the feature cache {self.path}")
            rows.append(row)
        return torch.from_numpy(np.ascontiguousarray(self.array[rows]))  # [n, N, Dv]
