"""Records -> tokenized samples (cached with `datasets.map`) -> per-sample tensors.

`tokenize_records` renders every record once (see `dataset.conversation` for the layout and the
label rule) into columns id, input_ids, labels, images, length, truncated. The result is cached
by `datasets` next to the records' Arrow file, under a fingerprint of the records, the
tokenizer's vocabulary and the settings, so a second run with the same inputs reads it back
memory-mapped. Over-long samples are truncated or dropped by `fit_to_length`; both are counted
and logged.

`SupervisedDataset` turns one row into tensors. Images are decoded and preprocessed by callables
owned by the vision tower (`visual.load_image`, `tower.preprocess`); this file never does image
arithmetic itself. With a `feature_cache` (`visual.feature_cache.FeatureCache`), a sample carries
the tower's cached output `vision_features` [n_img, N, Dv] instead of `pixel_values`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from dataprocess.schema import confined_image_path
from dataset.conversation import (
    DEFAULT_SYSTEM_PROMPT,
    ChatBlocks,
    encode_conversation,
    encode_text,
    fit_to_length,
)

if TYPE_CHECKING:
    from visual.feature_cache import FeatureCache

logger = logging.getLogger(__name__)

# Bump when the rendering or the columns change, so cached tokenizations are rebuilt.
TOKENIZE_VERSION = 1
_SHORTEST_PROBE = 1000  # records rendered again to explain an all-dropped error
_PROBE_TEXT = "The 3 quick brown foxes\n  jumped: 图像理解助手。 <|im_start|>ÄÖ émoji 🙂 1234"

SAMPLE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "images": datasets.List(datasets.Value("string")),
        "length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
    }
)


@dataclass(frozen=True)
class TokenizeStats:
    """How many records became samples, and how many were cut or dropped for length."""

    records: int
    samples: int
    truncated: int

    @property
    def dropped(self) -> int:
        return self.records - self.samples


def _tokenize_batch(batch: dict[str, list], **settings: Any) -> dict[str, list]:
    """Batched map function: render each record; rows that cannot fit are left out."""
    max_length = settings.pop("model_max_length")
    tokenizer = settings.pop("tokenizer")
    out: dict[str, list] = {name: [] for name in SAMPLE_FEATURES}
    blocks = ChatBlocks.build(tokenizer)
    rows = zip(batch["id"], batch["images"], batch["roles"], batch["contents"], strict=True)
    for record_id, images, roles, contents in rows:
        full = encode_conversation(tokenizer, roles, contents, blocks=blocks, **settings)
        sample = fit_to_length(full, max_length)
        if sample is None:
            continue
        out["id"].append(record_id)
        out["input_ids"].append(sample.input_ids)
        out["labels"].append(sample.labels)
        out["images"].append(images)
        out["length"].append(len(sample.input_ids))
        out["truncated"].append(len(sample.input_ids) < len(full.input_ids))
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A cheap identity of a tokenizer: class, size, special tokens and a probe encoding.

    Hashing the whole vocabulary takes seconds; two vocabularies that agree on all of this
    and on the probe text are, for caching purposes, the same.
    """
    special = getattr(tokenizer, "added_tokens_encoder", {})
    parts = [type(tokenizer).__qualname__, len(tokenizer), sorted(special.items())]
    parts.append(encode_text(tokenizer, _PROBE_TEXT))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def records_fingerprint(records: datasets.Dataset) -> str:
    """Identity of a records table, from public API only: its Arrow files and its ids in order.

    `load_records` names its Arrow file after the source file's identity and the checks, and ids
    are unique after validation, so files + ids (which also see a `select`) identify the rows.
    """
    ids = pa.table({"id": records.with_format("arrow")["id"]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ids.schema) as writer:
        writer.write_table(ids)
    digest = hashlib.sha256(repr([f["filename"] for f in records.cache_files]).encode())
    digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def _shortest_fit(records: datasets.Dataset, tokenizer: Any, settings: dict[str, Any]) -> int:
    """The smallest model_max_length that keeps one of the first records (for an error message).

    Asks `fit_to_length` itself (it keeps more as the limit grows), so the rule stays its own.
    """
    shortest = None
    blocks = ChatBlocks.build(tokenizer)
    head = records.select(range(min(len(records), _SHORTEST_PROBE)))
    for roles, contents in zip(head["roles"], head["contents"], strict=True):
        full = encode_conversation(tokenizer, roles, contents, blocks=blocks, **settings)
        low, high = 1, len(full.input_ids)  # fits at high; find the first length that fits
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fit_to_length(full, middle) else (middle + 1, high)
        shortest = high if shortest is None else min(shortest, high)
    return shortest or 0


def _nothing_fits(
    records: datasets.Dataset, tokenizer: Any, settings: dict[str, Any], source: str
) -> ValueError:
    """The error for a model_max_length that drops every sample, with the length that would do."""
    settings = dict(settings)
    model_max_length = settings.pop("model_max_length")
    shortest = _shortest_fit(records, tokenizer, settings)
    probed = "" if len(records) <= _SHORTEST_PROBE else f" of the first {_SHORTEST_PROBE}"
    return ValueError(
        f"--model_max_length {model_max_length} is shorter than every sample of {source} "
        f"(all {len(records)} dropped; the shortest{probed} needs {shortest} tokens)"
    )


def _log_length_cuts(
    records: datasets.Dataset,
    samples: datasets.Dataset,
    stats: TokenizeStats,
    model_max_length: int,
    source: str,
) -> None:
    """Warn with counts (and the first dropped ids): a cut or dropped sample is never silent."""
    if stats.truncated or stats.dropped:
        logger.warning(
            "%s, model_max_length=%d: %d of %d samples truncated, %d dropped (the cut would "
            "split an image or leave no answer token)",
            source, model_max_length, stats.truncated, stats.records, stats.dropped,
        )  # fmt: skip
    if stats.dropped:
        ids = records.with_format("arrow")["id"]
        kept = pc.is_in(ids, value_set=samples.with_format("arrow")["id"])
        dropped = pc.filter(ids, pc.invert(kept))
        logger.warning("dropped record ids (first 5): %s", dropped[:5].to_pylist())


def tokenize_records(
    records: datasets.Dataset,
    tokenizer: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    model_max_length: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    num_proc: int | None = None,
    source: str = "the records",
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenize all `records` (columns id, images, roles, contents) once, cached on disk.

    Raises ValueError naming `source` (the records file) when there is no record, or when
    `model_max_length` is shorter than every sample (nothing would be left to train on).
    """
    if len(records) == 0:
        raise ValueError(f"no records to tokenize in {source}")
    settings = {
        "image_token_id": image_token_id,
        "num_image_tokens": num_image_tokens,
        "model_max_length": model_max_length,
        "system_prompt": system_prompt,
    }
    # An explicit fingerprint: hashing the tokenizer object itself is slow and not stable.
    key = f"{TOKENIZE_VERSION}|{records_fingerprint(records)}|"
    key += f"{tokenizer_fingerprint(tokenizer)}|{settings}"
    samples = records.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, **settings},
        remove_columns=records.column_names,
        features=SAMPLE_FEATURES,
        num_proc=num_proc,
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc="tokenizing records",
    )
    if len(samples) == 0:
        raise _nothing_fits(records, tokenizer, settings, source)
    truncated = pc.sum(samples.with_format("arrow")["truncated"]).as_py() or 0
    stats = TokenizeStats(records=len(records), samples=len(samples), truncated=truncated)
    _log_length_cuts(records, samples, stats, model_max_length, source)
    return samples, stats


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized samples -> {"input_ids": [L], "labels": [L], "pixel_values": [n_img,3,H,W] | None}.

    `load_image(path) -> PIL.Image` and `preprocess(list[PIL.Image]) -> [n,3,H,W]` come from the
    vision tower. Image paths are resolved against `image_folder` by
    `dataprocess.schema.confined_image_path`, the rule the validator checked them with, so the
    file opened is the file validated. With `feature_cache`, images are not decoded: the
    sample's "vision_features" [n_img, N, Dv] (the frozen tower's output, read from the cache)
    replaces "pixel_values"; every image must be in the cache. `source` names the records file
    in errors.
    """

    def __init__(
        self,
        samples: datasets.Dataset,
        *,
        image_folder: str | os.PathLike | None,
        load_image: Callable[[Path], Image.Image],
        preprocess: Callable[[list[Image.Image]], torch.Tensor],
        feature_cache: FeatureCache | None = None,
        allow_outside_image_folder: bool = False,
        source: str = "the records",
    ) -> None:
        self.samples = samples
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.load_image = load_image
        self.preprocess = preprocess
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

    def _pixel_values(self, record_id: str, images: Sequence[str]) -> torch.Tensor | None:
        if not images:
            return None
        if self.image_folder is None:
            raise ValueError(
                f"record {record_id!r} of {self.source} has images but no image_folder was given"
            )
        paths = [
            confined_image_path(self.image_folder, p, allow_outside=self.allow_outside_image_folder)
            for p in images
        ]
        pixel_values = self.preprocess([self.load_image(path) for path in paths])
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(images):
            raise ValueError(
                f"record {record_id!r} of {self.source}: preprocess returned shape {tuple(pixel_values.shape)} for "
                f"{len(images)} image(s); expected [{len(images)}, 3, H, W]"
            )
        return pixel_values  # [n_img, 3, H, W]

    def image_inputs(self, row: dict) -> dict[str, torch.Tensor | None]:
        """A row's "pixel_values" [n_img, 3, H, W] or cached "vision_features" [n_img, N, Dv]."""
        if self.feature_cache is None:
            return {"pixel_values": self._pixel_values(row["id"], row["images"])}
        if row["images"]:
            return {"vision_features": self.feature_cache.features(row["images"])}
        return {"vision_features": None}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        row = self.samples[index]
        sample = {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),  # [L]
            "labels": torch.tensor(row["labels"], dtype=torch.long),  # [L]
        }
        return {**sample, **self.image_inputs(row)}
