"""Token-length statistics of a chat.json file, to choose ``--model_max_length``.

A record's length is the length of its training rendering: each record goes through
``dataset.processor.VLMProcessor.encode``, the encoder the dataset uses, with every ``<image>``
expanded to the image processor's count and the training default system prompt
(``qwen.chat_format.DEFAULT_SYSTEM_PROMPT``) where the record has none. The image processor is
the tower's (``--vision_model``), or a fixed grid of the N a checkpoint's ``vlm_config.json``
(``--model_weights``) or ``--num_image_tokens`` gives; an anyres checkpoint, or
``--image_aspect_ratio anyres`` with ``--vision_model``, tiles as training does (its pinpoints and
tile cap), and the summary then tallies the images by their token count. When its count depends on the image size,
each image's (height, width) is read from its file header under ``--image_folder``. This is the one part of ``dataprocess`` (with
``features``) that needs the model stack, so those imports sit inside the functions.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataprocess.reading import iter_raw_records
from dataprocess.schema import Record, RecordError, parse_record
from dataprocess.stats_settings import count_only

log = logging.getLogger(__name__)
CANDIDATE_LENGTHS = (512, 1024, 2048, 4096, 8192)


def record_length(
    record: Record,
    tokenizer: Any,
    image_processor: Any,
    system: str,
    image_token_id: int = 0,
    blocks: Any = None,
    image_sizes: list[tuple[int, int]] | None = None,
) -> int:
    """Tokens of ``record`` as training renders it (``dataset.processor``), images included;
    a preference record's longer row (its prompt and the longer of its two answers).

    ``image_processor`` is a ``visual.processing.ImageProcessor`` (an int N is a fixed grid of
    N); ``image_sizes`` ((height, width) per image) are needed when its count depends on them.
    The placeholder id does not change a length; pass the real one for clarity if you have it.
    """
    from dataset.processor import VLMProcessor  # imports torch

    if isinstance(image_processor, int):
        image_processor = count_only(image_processor)
    processor = VLMProcessor(tokenizer, image_token_id, image_processor, system_prompt=system)
    roles, contents = [t.role for t in record.turns], [t.content for t in record.turns]
    if record.is_preference:
        roles.append("assistant")
        contents.append(max(record.chosen, record.rejected, key=len))
    return len(processor.encode(roles, contents, image_sizes, blocks=blocks).input_ids)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(lengths: list[int], model_max_length: int | None = None) -> dict[str, Any]:
    """Percentiles, how many records exceed common limits, and the smallest limit that fits 99%."""
    values = sorted(lengths)
    summary: dict[str, Any] = {
        "records": len(values),
        "min": values[0] if values else 0,
        "mean": round(sum(values) / len(values), 1) if values else 0.0,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1] if values else 0,
        "over": {str(n): sum(v > n for v in values) for n in CANDIDATE_LENGTHS},
    }
    fitting = [n for n in CANDIDATE_LENGTHS if n >= summary["p99"]]
    summary["suggested_model_max_length"] = fitting[0] if fitting else summary["max"]
    if model_max_length is not None:
        summary["model_max_length"] = model_max_length
        summary["over_model_max_length"] = sum(v > model_max_length for v in values)
    return summary


def save_histogram(lengths: list[int], path: Path, model_max_length: int | None = None) -> None:
    """Write a histogram PNG; uses the Agg canvas directly, so no global backend is switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(lengths, bins=min(50, max(1, len(set(lengths)))), color="tab:blue")
    if model_max_length is not None:
        axes.axvline(model_max_length, color="tab:red", linestyle="--", label="model_max_length")
        axes.legend()
    axes.set_xlabel("tokens per record (images included)")
    axes.set_ylabel("records")
    axes.set_title(f"{len(lengths)} records")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def read_records(path: Path) -> Iterator[Record]:
    """The records of a chat.json / JSONL file as they are read (streaming: a corpus of millions
    is never held); the first bad record stops with its RecordError."""
    for index, raw in iter_raw_records(path):
        yield parse_record(raw, source=str(path), index=index)


def run_stats(
    data: Path,
    image_processor: Any,
    histogram: Path | None = None,
    model_max_length: int | None = None,
    system: str | None = None,
    tokenizer: Any = None,
    image_folder: Path | None = None,
) -> dict[str, Any]:
    """Lengths of every record of ``data`` with the Qwen tokenizer, summary and histogram PNG.

    ``image_processor`` gives the tokens per image (an int N is a fixed grid of N); when its
    count depends on the image size, the images are measured under ``image_folder``.
    ``system`` None means training's default system prompt.
    """
    from dataset.conversation import ChatBlocks  # imports torch; only this subcommand needs it
    from qwen import IMAGE_TOKEN, QWenTokenizer
    from qwen.chat_format import DEFAULT_SYSTEM_PROMPT

    if isinstance(image_processor, int):
        if image_processor < 0:
            raise ValueError(f"--num_image_tokens must be >= 0, got {image_processor}")
        image_processor = count_only(image_processor)
    per_image: Counter[int] = Counter()  # tokens -> images, when counts depend on the size
    sizes_of = _image_sizes_reader(image_processor, image_folder, per_image)
    if tokenizer is None:
        tokenizer = QWenTokenizer()
    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    blocks = ChatBlocks.build(tokenizer)  # built once, not per record
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    try:  # one int per record is kept, never the records
        lengths = [
            record_length(
                r, tokenizer, image_processor, system, image_token_id, blocks, sizes_of(r)
            )
            for r in read_records(data)
        ]
    except RecordError as exc:
        raise ValueError(f"{exc}; run `python -m dataprocess validate` first") from None
    summary = summarize(lengths, model_max_length)
    histogram = histogram or data.with_suffix(".lengths.png")
    save_histogram(lengths, histogram, model_max_length)
    summary["histogram"] = str(histogram)
    summary["num_image_tokens"] = image_processor.fixed_num_image_tokens
    if per_image:
        summary["image_tokens"] = image_token_summary(per_image)
    return summary


def image_token_summary(per_image: Counter[int]) -> dict[str, Any]:
    """Images per token count (the count follows the image size), and their min / mean / max."""
    images = sum(per_image.values())
    return {
        "images": images,
        "min": min(per_image),
        "mean": round(sum(t * n for t, n in per_image.items()) / images, 1),
        "max": max(per_image),
        "images_by_tokens": {str(t): per_image[t] for t in sorted(per_image)},
    }


def _image_sizes_reader(image_processor: Any, image_folder: Path | None, per_image: Counter):
    """record -> its images' (height, width), or None when the count does not depend on them;
    each image's token count is tallied in `per_image`."""
    if image_processor.fixed_num_image_tokens is not None:
        return lambda record: None
    if image_folder is None:
        raise ValueError(
            "the tokens per image depend on the image size here: pass --image_folder to measure them"
        )
    from dataprocess.schema import confined_image_path
    from visual.image_io import read_image_size

    def sizes(record: Record) -> list[tuple[int, int]]:
        found = [read_image_size(confined_image_path(image_folder, p)) for p in record.images]
        per_image.update(image_processor.num_image_tokens(size) for size in found)
        return found

    return sizes
