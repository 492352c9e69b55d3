"""Token-length statistics of a chat.json file, to choose ``--model_max_length``.

This is the one part of ``dataprocess`` that needs the model stack: :func:`run_stats` loads
``qwen.QWenTokenizer``, and importing ``qwen`` imports torch. The counting itself takes any object
with ``encode(text) -> list[int]``, so it is tested without torch.

A record's length follows the ChatML layout of ``qwen.chat_format.make_context``: per turn
``<|im_start|>{role}\\n{content}<|im_end|>\\n``, with the system prompt given on the command line
when the record has none, and each ``<image>`` counted as ``num_image_tokens`` tokens.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

from dataprocess.schema import IMAGE_MARKER, Record, RecordError, iter_raw_records, parse_record

log = logging.getLogger(__name__)
CANDIDATE_LENGTHS = (512, 1024, 2048, 4096, 8192)


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def record_length(
    record: Record, tokenizer: Encoder, num_image_tokens: int, system: str = ""
) -> int:
    """Tokens of ``record`` in ChatML, with every image counted as ``num_image_tokens``."""
    turns = [(t.role, t.content) for t in record.turns]
    if system and (not turns or turns[0][0] != "system"):
        turns.insert(0, ("system", system))
    newline = len(tokenizer.encode("\n"))
    total = 0
    for role, content in turns:
        markers = content.count(IMAGE_MARKER)
        text = content.replace(IMAGE_MARKER, "")
        # 2 = <|im_start|> and <|im_end|>; each is one special token.
        total += 2 + len(tokenizer.encode(f"{role}\n")) + len(tokenizer.encode(text)) + newline
        total += markers * num_image_tokens
    return total


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


def load_records(path: Path) -> list[Record]:
    """All records of a chat.json / JSONL file; the first bad record stops with its RecordError."""
    return [parse_record(raw, source=str(path), index=i) for i, raw in iter_raw_records(path)]


def run_stats(
    data: Path,
    num_image_tokens: int,
    histogram: Path | None = None,
    model_max_length: int | None = None,
    system: str = "You are a helpful assistant.",
    tokenizer: Encoder | None = None,
) -> dict[str, Any]:
    """Lengths of every record of ``data`` with the Qwen tokenizer, summary and histogram PNG."""
    if num_image_tokens < 0:
        raise ValueError(f"--num_image_tokens must be >= 0, got {num_image_tokens}")
    if tokenizer is None:
        from qwen import QWenTokenizer  # imports torch; only this subcommand needs it

        tokenizer = QWenTokenizer()
    try:
        records = load_records(data)
    except RecordError as exc:
        raise ValueError(f"{exc}; run `python -m dataprocess validate` first") from None
    lengths = [record_length(r, tokenizer, num_image_tokens, system) for r in records]
    summary = summarize(lengths, model_max_length)
    histogram = histogram or data.with_suffix(".lengths.png")
    save_histogram(lengths, histogram, model_max_length)
    summary["histogram"] = str(histogram)
    summary["num_image_tokens"] = num_image_tokens
    return summary
