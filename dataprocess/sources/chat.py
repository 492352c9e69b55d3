"""Converters for chat data already in (or close to) the LLaVA schema: LLaVA files and ShareGPT.

``llava``: LLaVA-Pretrain 558K, CC3M-595K ``chat.json``, LLaVA-Instruct-150K and its parts,
``llava_v1_5_mix665k.json`` (int ids, text-only records with a ``model`` key) and the LinkSoul
Chinese translations all share one schema, so they are read as-is and checked.

``box_format: qwen`` rewrites LLaVA ``[x1, y1, x2, y2]`` boxes as Qwen-VL ``<box>`` text.

``sharegpt``: text-only chats. Raw ShareGPT may start with the assistant or end with the user;
those turns are dropped and logged (the FastChat rules). A literal ``<image>`` in text-only data
would become an image placeholder downstream, so such records are rejected.
"""

from __future__ import annotations

from collections.abc import Iterator

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import IMAGE_MARKER, Record, RecordError, parse_record
from dataprocess.sources.common import apply_box_format, drop_leading_assistant, iter_file, role_of


def convert_llava(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """Read LLaVA ``chat.json`` records verbatim; schema faults are tallied, never fixed."""
    for path in source.paths:
        for index, raw in iter_file(path, tally):
            try:
                record = parse_record(raw, source=str(path), index=index)
                yield apply_box_format(record, source, tally)
            except RecordError as exc:
                tally.error(exc)


def _clean_sharegpt(raw: dict, record_id: str, path: str, index: int, tally: Tally) -> dict:
    turns = raw.get("conversations")
    if not isinstance(turns, list):
        return raw  # parse_record names the fault
    for turn in turns:
        if isinstance(turn, dict) and IMAGE_MARKER in str(turn.get("value", "")):
            raise RecordError(
                f"text-only chat contains the literal {IMAGE_MARKER}",
                kind="image_marker_in_text",
                record_id=record_id,
                source=path,
                index=index,
            )
    turns = drop_leading_assistant(turns, tally, record_id, path)
    if len(turns) >= 2 and role_of(turns[-1]) == "user":
        tally.change("dropped_trailing_user_turn", record_id, path, "dropped the last (user) turn")
        turns = turns[:-1]
    return {**raw, "conversations": turns}


def convert_sharegpt(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """Read ShareGPT-style text-only chats (JSON or JSONL), cleaning them by the FastChat rules."""
    for path in source.paths:
        for index, raw in iter_file(path, tally):
            if raw.get("id") is None:
                raw = {**raw, "id": f"{path.stem}_{index}"}
                tally.change("generated_id", raw["id"], str(path), f"record {index} had no id")
            record_id = str(raw["id"])
            try:
                if "image" in raw:
                    raise RecordError(
                        "a sharegpt source is text-only but the record has an 'image' key",
                        kind="unexpected_image",
                        record_id=record_id,
                        source=str(path),
                        index=index,
                    )
                cleaned = _clean_sharegpt(raw, record_id, str(path), index, tally)
                yield parse_record(cleaned, source=str(path), index=index)
            except RecordError as exc:
                tally.error(exc)
