"""Converters for caption corpora: AI Challenger 2017 (Chinese) and COCO captions (English).

Every caption becomes its own sample (nothing is sampled away here; ``sample`` in the config
does that, visibly). The instruction is drawn from the source's ``prompts`` with a seeded RNG
keyed by the record id, so a record's prompt does not depend on order or sampling. Captions are
stripped of surrounding whitespace only: newlines inside a caption are kept unless the source
sets ``join_lines: true`` (then each change is logged). Empty captions are dropped and logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import IMAGE_MARKER, Record, RecordError, parse_record
from dataprocess.sources.common import choose_prompt, iter_file, load_json_object

NEWLINES_RE = re.compile(r"\s*[\r\n]+\s*")


def _clean(caption: str, source: SourceConfig, record_id: str, path: str, tally: Tally) -> str:
    text = caption.strip()
    if source.join_lines and NEWLINES_RE.search(text):
        text = NEWLINES_RE.sub(" ", text)
        tally.change("joined_caption_lines", record_id, path, "replaced newlines by a space")
    return text


def _caption_record(
    record_id: str, image: str, caption: str, source: SourceConfig, path: str, index: int
) -> Record:
    prompt = choose_prompt(source.prompts, source.seed, record_id)
    raw = {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_MARKER}\n{prompt}"},
            {"from": "gpt", "value": caption},
        ],
    }
    return parse_record(raw, source=path, index=index)


def _aic_captions(raw: dict, path: str, index: int) -> tuple[str, list[Any]]:
    image_id, captions = raw.get("image_id"), raw.get("caption")
    label = str(image_id) if image_id is not None else None
    if not isinstance(image_id, str) or not image_id.strip():
        raise RecordError(
            "'image_id' must be a file name", kind="missing_field", source=path, index=index
        )
    if not isinstance(captions, list):
        raise RecordError(
            "'caption' must be a list of strings",
            kind="bad_type",
            record_id=label,
            source=path,
            index=index,
        )
    return image_id, captions


def convert_aic_captions(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """AI Challenger ``caption_*_annotations_*.json``: one record per caption, id ``<sha>_<k>``."""
    for path in source.paths:
        for index, raw in iter_file(path, tally):
            try:
                image_id, captions = _aic_captions(raw, str(path), index)
            except RecordError as exc:
                tally.error(exc)
                continue
            for k, caption in enumerate(captions):
                # k is the position in the original list, so a dropped caption leaves a traceable gap.
                record_id = f"{Path(image_id).stem}_{k}"
                try:
                    if not isinstance(caption, str):
                        raise RecordError(
                            f"caption {k} is {type(caption).__name__}, not a string",
                            kind="bad_type",
                            record_id=record_id,
                            source=str(path),
                            index=index,
                        )
                    text = _clean(caption, source, record_id, str(path), tally)
                    if not text:
                        tally.change(
                            "dropped_empty_caption", record_id, str(path), f"caption {k} is empty"
                        )
                        continue
                    yield _caption_record(record_id, image_id, text, source, str(path), index)
                except RecordError as exc:
                    tally.error(exc)


def _coco_images(top: dict, path: str) -> dict[Any, str]:
    images = top.get("images")
    if not isinstance(images, list) or not isinstance(top.get("annotations"), list):
        raise RecordError(
            "needs 'images' and 'annotations' lists", kind="missing_field", source=path
        )
    return {img.get("id"): img.get("file_name") for img in images if isinstance(img, dict)}


def convert_coco_captions(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """COCO ``captions_*.json``: one record per annotation, id = the annotation id."""
    for path in source.paths:
        try:
            top = load_json_object(path)
            files = _coco_images(top, str(path))
        except RecordError as exc:
            tally.error(exc)
            continue
        for index, ann in enumerate(top["annotations"]):
            tally.counts["read"] += 1
            try:
                if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                    raise RecordError(
                        "annotation needs a string 'caption'",
                        kind="bad_type",
                        source=str(path),
                        index=index,
                    )
                record_id = str(ann.get("id", index))
                file_name = files.get(ann.get("image_id"))
                if not isinstance(file_name, str):
                    raise RecordError(
                        f"image_id {ann.get('image_id')!r} has no entry in 'images'",
                        kind="unknown_image_id",
                        record_id=record_id,
                        source=str(path),
                        index=index,
                    )
                text = _clean(ann["caption"], source, record_id, str(path), tally)
                if not text:
                    tally.change("dropped_empty_caption", record_id, str(path), "caption is empty")
                    continue
                yield _caption_record(record_id, file_name, text, source, str(path), index)
            except RecordError as exc:
                tally.error(exc)
