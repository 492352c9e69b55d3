"""Helpers shared by the converters: reading files into a tally, cleaning roles, prompts."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from dataprocess.boxes import convert_box_text
from dataprocess.config import SourceConfig
from dataprocess.reading import iter_raw_records
from dataprocess.report import Tally
from dataprocess.schema import ROLE_ALIASES, Record, RecordError, Turn


def iter_file(path: Path, tally: Tally) -> Iterator[tuple[int, dict]]:
    """Yield raw records of one file. A broken record slot (a JSONL line that does not parse) is
    tallied and reading goes on; a fault of the whole file is tallied and ends the file."""
    try:
        for index, raw in iter_raw_records(path, on_error=tally.error):
            tally.counts["read"] += 1
            yield index, raw
    except RecordError as exc:
        tally.error(exc)


def load_json_object(path: Path) -> dict[str, Any]:
    """Read a file whose top level is one JSON object (COCO annotations)."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RecordError(
            f"cannot read file: {exc.strerror}", kind="unreadable_file", source=source
        ) from None
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"invalid UTF-8 at byte {exc.start}", kind="invalid_utf8", source=source
        ) from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"invalid JSON: {exc.msg} (line {exc.lineno})", kind="invalid_json", source=source
        ) from None
    if not isinstance(top, dict):
        raise RecordError(
            f"top level is {type(top).__name__}, expected an object", kind="bad_type", source=source
        )
    return top


def role_of(turn: Any) -> str | None:
    """The canonical role of a raw turn, or None when it is not a known role."""
    if isinstance(turn, dict) and isinstance(turn.get("from"), str):
        return ROLE_ALIASES.get(turn["from"])
    return None


def drop_leading_assistant(
    turns: list[Any], tally: Tally, record_id: str | None, source: str
) -> list[Any]:
    """Drop assistant turns before the first user turn (after an optional system turn), logged.

    Raw ShareGPT and Qwen-VL data start some chats with the assistant; both FastChat and Qwen-VL's
    finetune.py drop such turns, and so do we, but we say so.
    """
    start = 1 if turns and role_of(turns[0]) == "system" else 0
    end = start
    while end < len(turns) and role_of(turns[end]) == "assistant":
        end += 1
    if end > start:
        tally.change(
            "dropped_leading_assistant_turn",
            record_id,
            source,
            f"dropped {end - start} assistant turn(s) before the first user turn",
        )
    return turns[:start] + turns[end:]


def choose_prompt(prompts: tuple[str, ...], seed: int, record_id: str) -> str:
    """Pick a prompt from the record id and the seed, so a record's prompt never depends on order."""
    return random.Random(f"{seed}|{record_id}").choice(prompts)


def apply_box_format(record: Record, source: SourceConfig, tally: Tally) -> Record:
    """Rewrite the record's boxes in the source's ``box_format`` (``keep`` leaves it as it is);
    a changed record is logged, a malformed ``<box>`` raises RecordError naming the record."""
    if source.box_format == "keep":
        return record
    try:
        turns = tuple(
            Turn(t.role, convert_box_text(t.content, source.box_format)) for t in record.turns
        )
    except ValueError as exc:
        raise RecordError(
            str(exc), kind="bad_box", record_id=record.id, source=record.source
        ) from None
    if turns == record.turns:
        return record
    tally.change("converted_boxes", record.id, record.source, f"boxes to {source.box_format}")
    return replace(record, turns=turns)
