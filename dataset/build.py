"""One call from a records file to a `SupervisedDataset`: load + validate, tokenize, wrap."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from dataprocess.schema import confined_image_path
from dataset.loading import load_records
from dataset.processor import VLMProcessor
from dataset.samples import tokenize_records
from dataset.supervised import SupervisedDataset

if TYPE_CHECKING:
    from visual.feature_cache import FeatureCache

logger = logging.getLogger(__name__)


def build_supervised_dataset(
    path: str | os.PathLike,
    processor: VLMProcessor,
    *,
    image_folder: str | os.PathLike | None,
    load_image: Callable[[Path], Image.Image],
    model_max_length: int,
    read_image_size: Callable[[Path], tuple[int, int]] | None = None,
    skip_invalid: bool = False,
    check_images: bool = True,
    allow_outside_image_folder: bool = False,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    feature_cache: FeatureCache | None = None,
) -> SupervisedDataset:
    """Validate `path` (raising before training on bad records unless `skip_invalid`, and on a
    file with no valid record or no sample that fits), tokenize it (cached) and return the torch
    dataset. See `load_records` / `tokenize_records`; with `feature_cache`, samples carry cached
    tower features (see `SupervisedDataset`). Image paths must stay inside `image_folder` unless
    `allow_outside_image_folder`, at validation and when the images are opened.
    `read_image_size(path) -> (height, width)` (`visual.image_io.read_image_size`) is needed
    only by a processor whose token count depends on the image size.
    """
    records, report = load_records(
        path,
        image_folder=image_folder,
        skip_invalid=skip_invalid,
        check_images=check_images,
        allow_outside_image_folder=allow_outside_image_folder,
        cache_dir=cache_dir,
    )
    sizes_of = header_sizes_reader(read_image_size, image_folder, allow_outside_image_folder)
    samples, stats = tokenize_records(
        records,
        processor,
        model_max_length=model_max_length,
        image_sizes_of=sizes_of,
        num_proc=num_proc,
        source=str(path),
    )
    logger.info(
        "%s: %d records, %d invalid skipped, %d samples (%d truncated, %d dropped for length)",
        path, report.counts["read"], report.num_invalid,
        stats.samples, stats.truncated, stats.dropped,
    )  # fmt: skip
    return SupervisedDataset(
        samples,
        image_folder=image_folder,
        load_image=load_image,
        processor=processor,
        feature_cache=feature_cache,
        allow_outside_image_folder=allow_outside_image_folder,
        source=str(path),
    )


def header_sizes_reader(
    read_image_size: Callable[[Path], tuple[int, int]] | None,
    image_folder: str | os.PathLike | None,
    allow_outside_image_folder: bool,
) -> Callable[[Sequence[str]], list[tuple[int, int]]] | None:
    """`image_sizes_of(record's image paths)` for tokenization, or None without a reader or a
    folder (a fixed-grid processor never asks)."""
    if read_image_size is None or image_folder is None:
        return None
    return functools.partial(
        image_sizes_from_headers, read_image_size, Path(image_folder), allow_outside_image_folder
    )


def image_sizes_from_headers(
    read_image_size: Callable[[Path], tuple[int, int]],
    image_folder: Path,
    allow_outside: bool,
    images: Sequence[str],
) -> list[tuple[int, int]]:
    """(height, width) of a record's images, the files resolved as the dataset opens them."""
    paths = [confined_image_path(image_folder, p, allow_outside=allow_outside) for p in images]
    return [read_image_size(path) for path in paths]
