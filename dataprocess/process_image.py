"""Resize every image a chat.json refers to into a cache folder, once, ahead of training.

The cache mirrors the image folder (same relative paths), so training reads it by pointing its
image folder at the cache; records need no change. Without ``pad`` the shorter side is resized
to ``size`` (the tower's processor then does its usual centre crop on a small image); with
``pad`` the image is first padded to a square with the CLIP mean colour, centred as LLaVA's
``expand2square`` does, then resized to ``size`` x ``size``.

Resumable: an image whose cache file exists is skipped. Files are written to a temporary name
and renamed, so an interrupted run leaves no half-written image. Corrupt files are skipped and
listed in ``<cache>/corrupt.txt``. Work runs in a process pool with a tqdm progress bar.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from dataprocess.schema import iter_raw_records, parse_record

log = logging.getLogger(__name__)
# OpenAI-CLIP mean (0.48145466, 0.4578275, 0.40821073) x 255, the colour LLaVA pads with.
PAD_COLOR = (122, 116, 104)
# Formats PIL writes from RGB by extension; anything else (GIF, WebP, BMP...) is stored as PNG
# data under the original name, which PIL reads by content, not by extension.
SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def expand_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad to a square, image centred (offsets floor((long - short) / 2), as expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_image(image: Image.Image, size: int, pad: bool) -> Image.Image:
    """RGB image at the tower's input size (see the module docstring for the two modes)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    if pad:
        return expand_to_square(image).resize((size, size), Image.Resampling.BICUBIC)
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _process_one(task: tuple[str, str, str, int, bool]) -> tuple[str, str, str]:
    """(relative path, status "done" | "corrupt", message); runs in a worker process."""
    relative, root, cache, size, pad = task
    source, target = Path(root) / relative, Path(cache) / relative
    try:
        with Image.open(source) as image:
            image.load()
            resized = resize_image(image, size, pad)
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "skip it"
        return relative, "corrupt", f"{source}: {type(exc).__name__}: {exc}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fmt = SAVE_FORMATS.get(target.suffix.lower(), "PNG")
    resized.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, target)
    return relative, "done", ""


def referenced_images(data: Path) -> list[str]:
    """Distinct image paths of a chat.json / JSONL file, sorted."""
    paths = {
        p
        for i, raw in iter_raw_records(data)
        for p in parse_record(raw, source=str(data), index=i).images
    }
    return sorted(paths)


def process_images(
    data: Path, image_folder: Path, cache: Path, size: int, pad: bool = False, workers: int = 4
) -> dict[str, Any]:
    """Resize all images of ``data`` into ``cache``; returns counts and the corrupt list path."""
    if size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    todo, skipped = [], 0
    for relative in referenced_images(data):
        if (cache / relative).is_file():
            skipped += 1  # done by an earlier run
        else:
            todo.append((relative, str(image_folder), str(cache), size, pad))
    corrupt: list[str] = []
    done = 0
    cache.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_process_one, todo, chunksize=16)
        for relative, status, message in tqdm(results, total=len(todo), desc="images", unit="img"):
            if status == "corrupt":
                log.warning("skipping corrupt image %s", message)
                corrupt.append(f"{relative}\t{message}")
            else:
                done += 1
    corrupt_list = cache / "corrupt.txt"
    corrupt_list.write_text("".join(line + "\n" for line in corrupt), encoding="utf-8")
    return {
        "resized": done,
        "skipped_existing": skipped,
        "corrupt": len(corrupt),
        "corrupt_list": str(corrupt_list),
        "cache": str(cache),
    }
