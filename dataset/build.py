"""One call from a records file to a `SupervisedDataset`: load + validate, tokenize, wrap."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from dataset.conversation import DEFAULT_SYSTEM_PROMPT
from dataset.loading import load_records
from dataset.samples import SupervisedDataset, tokenize_records

if TYPE_CHECKING:
    from visual.feature_cache import FeatureCache

logger = logging.getLogger(__name__)


def build_supervised_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    image_folder: str | os.PathLike | None,
    load_image: Callable[[Path], Image.Image],
    preprocess: Callable[[list[Image.Image]], torch.Tensor],
    image_token_id: int,
    num_image_tokens: int,
    model_max_length: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
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
    """
    records, report = load_records(
        path,
        image_folder=image_folder,
        skip_invalid=skip_invalid,
        check_images=check_images,
        allow_outside_image_folder=allow_outside_image_folder,
        cache_dir=cache_dir,
    )
    samples, stats = tokenize_records(
        records,
        tokenizer,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        model_max_length=model_max_length,
        system_prompt=system_prompt,
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
        preprocess=preprocess,
        feature_cache=feature_cache,
        allow_outside_image_folder=allow_outside_image_folder,
        source=str(path),
    )
