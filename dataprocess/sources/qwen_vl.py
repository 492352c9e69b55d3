"""Converter for the Qwen-VL finetune format (``QwenLM/Qwen-VL`` README, finetune.py).

Images sit inline as ``Picture N: <img>PATH</img>`` (with or without the space after the colon);
each becomes an ``<image>`` marker and PATH joins the record's image list, in order. Boxes,
``<ref>text</ref><box>(x1,y1),(x2,y2)</box>`` with integers in [0, 1000), stay as text (the
validator checks their range) unless ``box_format: llava`` rewrites them as ``[x1, y1, x2, y2]``.
URLs are rejected: chat.json holds local paths only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import IMAGE_MARKER, Record, RecordError, parse_record
from dataprocess.sources.common import apply_box_format, drop_leading_assistant, iter_file, role_of

# "Picture 1: <img>a.jpg</img>\n" -> "<image>\n"; the "Picture N:" prefix is optional.
PICTURE_RE = re.compile(r"(?:Picture\s*\d+:\s?)?<img>(.*?)</img>\n?", re.DOTALL)
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _convert_turns(raw: dict, record_id: str, path: str, index: int) -> tuple[list, list[str]]:
    images: list[str] = []
    turns: list = []

    def fail(problem: str, kind: str) -> RecordError:
        return RecordError(problem, kind=kind, record_id=record_id, source=path, index=index)

    for position, turn in enumerate(raw["conversations"]):
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str) or "<img>" not in value:
            turns.append(turn)
            continue
        if role_of(turn) != "user":
            raise fail(f"turn {position} ({turn.get('from')}) holds an <img>", "image_in_answer")
        found = [m.strip() for m in PICTURE_RE.findall(value)]
        for image in found:
            if not image:
                raise fail(f"turn {position} has an empty <img></img>", "bad_image_path")
            if URL_RE.match(image):
                raise fail(
                    f"turn {position} refers to a URL {image!r}; download it first", "image_url"
                )
        images.extend(found)
        turns.append({**turn, "value": PICTURE_RE.sub(IMAGE_MARKER + "\n", value)})
    return turns, images


def convert_qwen_vl(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """Read Qwen-VL finetune records and rewrite their inline images as ``<image>`` markers."""
    for path in source.paths:
        for index, raw in iter_file(path, tally):
            record_id = str(raw.get("id"))
            try:
                if not isinstance(raw.get("conversations"), list):
                    yield parse_record(raw, source=str(path), index=index)  # raises, naming it
                    continue
                if any(
                    IMAGE_MARKER in str(t.get("value", ""))
                    for t in raw["conversations"]
                    if isinstance(t, dict)
                ):
                    raise RecordError(
                        f"Qwen-VL text contains a literal {IMAGE_MARKER}",
                        kind="image_marker_in_text",
                        record_id=record_id,
                        source=str(path),
                        index=index,
                    )
                turns, images = _convert_turns(raw, record_id, str(path), index)
                turns = drop_leading_assistant(turns, tally, record_id, str(path))
                converted = {"id": raw.get("id"), "conversations": turns}
                if images:
                    converted["image"] = images
                record = parse_record(converted, source=str(path), index=index)
                yield apply_box_format(record, source, tally)
            except RecordError as exc:
                tally.error(exc)
