"""Resize every image a chat.json refers to into a cache folder, once, ahead of training.

The cache mirrors the image folder (same relative paths), so training reads it by pointing its
image folder at the cache; records need no change. Without a pad colour the shorter side is
resized to ``size`` (the tower's processor then does its usual centre crop on a small image);
with one the image is first padded to a square of that colour, centred as LLaVA's
``expand2square`` does, then resized to ``size`` x ``size``. The colour is the tower's own mean
colour, read from its preprocessor (:func:`tower_geometry`): CLIP and SigLIP differ.

Image paths are confined to the image folder like everywhere else
(:func:`dataprocess.schema.confined_image_path`). A path allowed outside it
(``--allow_outside_image_folder``) has no place in a mirror of the folder: it is skipped,
counted and listed, and training reads it from where it is.

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

from PIL import Image
from tqdm import tqdm

from dataprocess.reading import iter_raw_records
from dataprocess.schema import RecordError, confined_image_path, parse_record

log = logging.getLogger(__name__)
Color = tuple[int, int, int]
# Formats PIL writes from RGB by extension; anything else (GIF, WebP, BMP...) is stored as PNG
# data under the original name, which PIL reads by content, not by extension.
SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def tower_geometry(
    vision_model: str, library: str = "transformers", pretrained: str | None = None
) -> tuple[int, Color]:
    """(input size, mean colour in 0..255) of a vision tower, read from its preprocessor."""
    from visual import load_vision_tower  # imports torch: only the commands that need it

    preprocessor = load_vision_tower(
        vision_model, library=library, pretrained=pretrained
    ).preprocessor
    return min(preprocessor.output_size), preprocessor.fill_color


def expand_to_square(image: Image.Image, color: Color) -> Image.Image:
    """Pad to a square, image centred (offsets floor((long - short) / 2), as expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_image(image: Image.Image, size: int, pad_color: Color | None) -> Image.Image:
    """RGB image at the tower's input size (see the module docstring for the two modes)."""
    from visual.image_io import to_rgb  # training's decoding rules: 16-bit, alpha, EXIF

    image = to_rgb(image)
    if pad_color is not None:
        square = expand_to_square(image, pad_color)
        return square.resize((size, size), Image.Resampling.BICUBIC)
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _process_one(task: tuple[str, str, str, int, Color | None]) -> tuple[str, str, str]:
    """(relative path, status "done" | "corrupt", message); runs in a worker process."""
    from visual.image_io import load_image  # the one decoder, as training reads the original

    relative, source_path, target_path, size, pad_color = task
    source, target = Path(source_path), Path(target_path)
    try:
        resized = resize_image(load_image(source), size, pad_color)
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "skip it"
        return relative, "corrupt", f"{source}: {type(exc).__name__}: {exc}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fmt = SAVE_FORMATS.get(target.suffix.lower(), "PNG")
    resized.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, target)
    return relative, "done", ""


def referenced_images(
    data: Path, image_folder: Path | None = None, *, allow_outside: bool = False
) -> list[str]:
    """Distinct image paths of a chat.json / JSONL file, sorted; the first bad record raises
    RecordError naming its id and file, a path leaving ``image_folder`` included."""
    paths: set[str] = set()
    for index, raw in iter_raw_records(data):
        record = parse_record(raw, source=str(data), index=index)
        for path in record.images:
            try:
                confined_image_path(image_folder or ".", path, allow_outside=allow_outside)
            except RecordError as exc:
                raise RecordError(
                    exc.problem, kind=exc.kind, record_id=record.id, source=str(data), index=index
                ) from None
            paths.add(path)
    return sorted(paths)


def _tasks(
    paths: list[str], image_folder: Path, cache: Path, size: int, pad_color: Color | None
) -> tuple[list[tuple], int, list[str]]:
    """(work to do, images already in the cache, paths that cannot live in the cache)."""
    todo, skipped, outside = [], 0, []
    for relative in paths:
        # referenced_images already refused what the flags do not allow
        source = confined_image_path(image_folder, relative, allow_outside=True)
        try:
            target = confined_image_path(cache, relative)
        except RecordError:
            outside.append(relative)
            continue
        if target.is_file():
            skipped += 1  # done by an earlier run
        else:
            todo.append((relative, str(source), str(target), size, pad_color))
    return todo, skipped, outside


def process_images(
    data: Path,
    image_folder: Path,
    cache: Path,
    size: int,
    pad_color: Color | None = None,
    workers: int = 4,
    *,
    allow_outside: bool = False,
) -> dict[str, Any]:
    """Resize all images of ``data`` into ``cache``; returns counts and the corrupt list path.

    ``pad_color`` (the tower's mean colour, :func:`tower_geometry`) pads to a square first.
    """
    if size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    paths = referenced_images(data, image_folder, allow_outside=allow_outside)
    todo, skipped, outside = _tasks(paths, image_folder, cache, size, pad_color)
    for relative in outside:
        log.warning(
            "not cached: %s leaves the image folder, so its mirror cannot hold it", relative
        )
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
        "outside_image_folder": len(outside),
        "pad_color": list(pad_color) if pad_color is not None else None,
        "cache": str(cache),
    }
