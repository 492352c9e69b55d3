"""One tokenized sample -> tensors: `input_ids`, `labels`, and its images' `pixel_values` and
`image_sizes` (or cached `vision_features`).

Images are decoded by `visual.load_image` and turned into `pixel_values` + `image_sizes` by the
processor (`dataset.processor`); this file never does image arithmetic itself. With a
`feature_cache` (`visual.feature_cache.FeatureCache`), a sample carries the tower's cached output
`vision_features` [n_img, N, Dv] instead of `pixel_values`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow.compute as pc
import torch
from PIL import Image

from dataprocess.schema import confined_image_path
from dataset.processor import VLMProcessor

if TYPE_CHECKING:
    from visual.feature_cache import FeatureCache


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized samples -> {"input_ids": [L], "labels": [L], "pixel_values": [n_img,3,H,W] | None,
    "image_sizes": [n_img, 2] | None}.

    `load_image(path) -> PIL.Image` comes from `visual`; `processor.image_inputs` turns the
    decoded images into `pixel_values` and `image_sizes` (`dataset.processor`). Image paths are resolved against `image_folder` by
    `dataprocess.schema.confined_image_path`, the rule the validator checked them with, so the
    file opened is the file validated. With `feature_cache`, images are not decoded: the
    sample's "vision_features" [n_img, N, Dv] (the frozen tower's output, read from the cache)
    replaces "pixel_values"; every image must be in the cache. `source` names the records file
    in errors.
    """

    ids_column = "input_ids"  # the column whose placeholders the images must fill

    def __init__(
        self,
        samples: datasets.Dataset,
        *,
        image_folder: str | os.PathLike | None,
        load_image: Callable[[Path], Image.Image],
        processor: VLMProcessor,
        feature_cache: FeatureCache | None = None,
        allow_outside_image_folder: bool = False,
        source: str = "the records",
    ) -> None:
        self.samples = samples
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.load_image = load_image
        self.processor = processor  # light: the tokenizer is not used here, workers copy it once
        self.feature_cache = feature_cache
        self.allow_outside_image_folder = allow_outside_image_folder
        self.source = source
        if feature_cache is not None:
            self._check_cache_covers(feature_cache)

    def _check_cache_covers(self, cache: FeatureCache) -> None:
        """Fail now, not mid-epoch, when a sample's image has no row in the cache."""
        images = pc.unique(pc.list_flatten(self.samples.data.column("images"))).to_pylist()
        missing = cache.missing(images)
        if not missing:
            return
        first = missing[0]
        record_id = next(
            row["id"]
            for row in self.samples.select_columns(["id", "images"])
            if first in row["images"]
        )
        raise ValueError(
            f"{len(missing)} image(s) of the samples are not in the feature cache {cache.path}, "
            f"e.g. {first!r} of record {record_id!r}; rebuild the cache with "
            "`python -m dataprocess features` over these records"
        )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Token length of every sample (for a length-grouped sampler)."""
        return self.samples.data.column("length").to_pylist()

    def _image_inputs(self, row: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """`pixel_values` and `image_sizes` of a row's images (both None without images)."""
        record_id, images = row["id"], row["images"]
        if not images:
            return {"pixel_values": None, "image_sizes": None}
        if self.image_folder is None:
            raise ValueError(
                f"record {record_id!r} of {self.source} has images but no image_folder was given"
            )
        paths = [
            confined_image_path(self.image_folder, p, allow_outside=self.allow_outside_image_folder)
            for p in images
        ]
        inputs = self.processor.image_inputs([self.load_image(path) for path in paths])
        pixel_values = inputs["pixel_values"]  # [n_img, 3, H, W], or all tiles for a tiling one
        fixed = self.processor.fixed_num_image_tokens
        if pixel_values.dim() != 4 or (fixed is not None and pixel_values.shape[0] != len(images)):
            raise ValueError(
                f"record {record_id!r} of {self.source}: preprocess returned shape "
                f"{tuple(pixel_values.shape)} for {len(images)} image(s); expected "
                f"[{len(images)}, 3, H, W]"
            )
        self._check_counts(row, inputs["image_sizes"])
        return inputs

    def _check_counts(self, row: dict[str, Any], image_sizes: torch.Tensor) -> None:
        """The decoded images must give the placeholder count the row was tokenized with (a file
        changed since, or a header that lied about the size, would misalign the splice)."""
        expected = sum(self.processor.image_token_counts(image_sizes))
        found = row[self.ids_column].count(self.processor.image_token_id)
        if expected != found:
            raise ValueError(
                f"record {row['id']!r} of {self.source}: its images now give {expected} image "
                f"tokens, the tokenized sample holds {found}; were the image files changed?"
            )

    def _image_inputs_or_cached(self, row: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """A row's `pixel_values` + `image_sizes`, or its cached `vision_features`."""
        if self.feature_cache is None:
            return self._image_inputs(row)
        if row["images"]:
            return {"vision_features": self.feature_cache.features(row["images"])}  # [n, N, Dv]
        return {"vision_features": None}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        row = self.samples[index]
        sample = {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),  # [L]
            "labels": torch.tensor(row["labels"], dtype=torch.long),  # [L]
        }
        return {**sample, **self._image_inputs_or_cached(row)}
