"""Records -> tokenized samples (cached with `datasets.map`) -> per-sample tensors.

`tokenize_records` renders every record once (see `dataset.conversation` for the layout and the
label rule) into columns id, input_ids, labels, images, length, truncated. The result is cached
by `datasets` next to the records' Arrow file, under a fingerprint of the records, the
tokenizer's vocabulary and the settings, so a second run with the same inputs reads it back
memory-mapped. Over-long samples are truncated or dropped by `fit_to_length`; both are counted
and logged.

Placeholder runs have the lengths `dataset.processor.VLMProcessor` gives each image (for a
size-dependent image processor, from each file's header size); a record whose images alone
exceed `model_max_length` is refused, naming it.

`dataset.supervised.SupervisedDataset` turns one tokenized row into tensors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from dataset.conversation import ChatBlocks, EncodedConversation, encode_text, fit_to_length
from dataset.processor import VLMProcessor

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


def _tokenize_batch(
    batch: dict[str, list],
    processor: VLMProcessor,
    model_max_length: int,
    image_sizes_of: Callable[[Sequence[str]], list[tuple[int, int]]] | None,
    source: str,
) -> dict[str, list]:
    """Batched map function: render each record; rows that cannot fit are left out."""
    out: dict[str, list] = {name: [] for name in SAMPLE_FEATURES}
    blocks = ChatBlocks.build(processor.tokenizer)
    rows = zip(batch["id"], batch["images"], batch["roles"], batch["contents"], strict=True)
    for record_id, images, roles, contents in rows:
        sizes = image_sizes_of(images) if image_sizes_of is not None else None
        full = _encode(processor, record_id, source, roles, contents, sizes, blocks)
        _check_images_fit(full, processor, record_id, source, model_max_length)
        sample = fit_to_length(full, model_max_length)
        if sample is None:
            continue
        out["id"].append(record_id)
        out["input_ids"].append(sample.input_ids)
        out["labels"].append(sample.labels)
        out["images"].append(images)
        out["length"].append(len(sample.input_ids))
        out["truncated"].append(len(sample.input_ids) < len(full.input_ids))
    return out


def _encode(
    processor: VLMProcessor,
    record_id: str,
    source: str,
    roles: Sequence[str],
    contents: Sequence[str],
    sizes: list[tuple[int, int]] | None,
    blocks: ChatBlocks,
) -> EncodedConversation:
    try:
        return processor.encode(roles, contents, sizes, blocks=blocks)
    except ValueError as err:
        raise ValueError(f"record {record_id!r} of {source}: {err}") from err


def _check_images_fit(
    sample: EncodedConversation,
    processor: VLMProcessor,
    record_id: str,
    source: str,
    model_max_length: int,
) -> None:
    """Refuse a record whose image placeholders alone exceed the length: no cut can keep it,
    and with size-dependent counts a silent drop would hide a bad --model_max_length."""
    placeholders = sample.input_ids.count(processor.image_token_id)
    if placeholders > model_max_length:
        raise ValueError(
            f"record {record_id!r} of {source}: its images alone take {placeholders} tokens, "
            f"more than --model_max_length {model_max_length}"
        )


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


def _shortest_fit(records: datasets.Dataset, settings: dict[str, Any]) -> int:
    """The smallest model_max_length that keeps one of the first records (for an error message).

    Asks `fit_to_length` itself (it keeps more as the limit grows), so the rule stays its own.
    """
    shortest = None
    processor, sizes_of = settings["processor"], settings["image_sizes_of"]
    blocks = ChatBlocks.build(processor.tokenizer)
    head = records.select(range(min(len(records), _SHORTEST_PROBE)))
    for images, roles, contents in zip(
        head["images"], head["roles"], head["contents"], strict=True
    ):
        sizes = sizes_of(images) if sizes_of is not None else None
        full = processor.encode(roles, contents, sizes, blocks=blocks)
        low, high = 1, len(full.input_ids)  # fits at high; find the first length that fits
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fit_to_length(full, middle) else (middle + 1, high)
        shortest = high if shortest is None else min(shortest, high)
    return shortest or 0


def _nothing_fits(records: datasets.Dataset, settings: dict[str, Any], source: str) -> ValueError:
    """The error for a model_max_length that drops every sample, with the length that would do."""
    shortest = _shortest_fit(records, settings)
    probed = "" if len(records) <= _SHORTEST_PROBE else f" of the first {_SHORTEST_PROBE}"
    return ValueError(
        f"--model_max_length {settings['model_max_length']} is shorter than every sample of "
        f"{source} (all {len(records)} dropped; the shortest{probed} needs {shortest} tokens)"
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


def map_with_processor(
    records: datasets.Dataset,
    function: Callable[..., dict[str, list]],
    processor: VLMProcessor,
    *,
    model_max_length: int,
    image_sizes_of: Callable[[Sequence[str]], list[tuple[int, int]]] | None,
    num_proc: int | None,
    source: str,
    features: datasets.Features,
    version: str,
    desc: str,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """`records.map(function)` (batched) with the processor's settings as its keyword arguments,
    cached on disk under a key of the records, the processor and the length; returns the mapped
    table and those settings. Header sizes are read only when the count depends on them."""
    if processor.fixed_num_image_tokens is not None:
        image_sizes_of = None  # one count for every image: no file needs opening
    settings = {
        "processor": processor,
        "model_max_length": model_max_length,
        "image_sizes_of": image_sizes_of,
        "source": source,
    }
    # An explicit fingerprint: hashing the tokenizer object itself is slow and not stable.
    key = f"{version}|{records_fingerprint(records)}|"
    key += f"{tokenizer_fingerprint(processor.tokenizer)}|{processor.image_token_id}|"
    key += f"{processor.image_processor!r}|{model_max_length}|{processor.system_prompt!r}"
    mapped = records.map(
        function,
        batched=True,
        fn_kwargs=settings,
        remove_columns=records.column_names,
        features=features,
        num_proc=num_proc,
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc=desc,
    )
    return mapped, settings


def tokenize_records(
    records: datasets.Dataset,
    processor: VLMProcessor,
    *,
    model_max_length: int,
    image_sizes_of: Callable[[Sequence[str]], list[tuple[int, int]]] | None = None,
    num_proc: int | None = None,
    source: str = "the records",
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenize all `records` (columns id, images, roles, contents) once, cached on disk.

    Placeholder runs have the processor's count per image. When that count depends on the image
    size (`processor.fixed_num_image_tokens` is None), `image_sizes_of(record's image paths)`
    gives the (height, width) of each image, read from the files' headers.

    Raises ValueError naming `source` (the records file) when there is no record, when a
    record's images alone exceed `model_max_length` (naming the record), or when
    `model_max_length` is shorter than every sample (nothing would be left to train on).
    """
    if len(records) == 0:
        raise ValueError(f"no records to tokenize in {source}")
    if processor.fixed_num_image_tokens is None and image_sizes_of is None:
        raise ValueError(
            "the processor's token count depends on the image size: give image_sizes_of"
        )
    samples, settings = map_with_processor(
        records,
        _tokenize_batch,
        processor,
        model_max_length=model_max_length,
        image_sizes_of=image_sizes_of,
        num_proc=num_proc,
        source=source,
        features=SAMPLE_FEATURES,
        version=str(TOKENIZE_VERSION),
        desc="tokenizing records",
    )
    if len(samples) == 0:
        raise _nothing_fits(records, settings, source)
    truncated = pc.sum(samples.with_format("arrow")["truncated"]).as_py() or 0
    stats = TokenizeStats(records=len(records), samples=len(samples), truncated=truncated)
    _log_length_cuts(records, samples, stats, model_max_length, source)
    return samples, stats
