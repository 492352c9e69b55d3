"""The validator: the checks that need more than one record, the image files or the text.

Schema faults (roles, empty turns, ``<image>`` counts, ...) are found by
:func:`dataprocess.schema.parse_record`. Here we add: duplicate ids, Qwen-style boxes outside
[0, 1000) or with x1 >= x2 / y1 >= y2, Qwen special tokens that must not reach chat.json, and
images that are missing or do not decode. An image listed as ``.jpg`` that exists only as
``.png``/``.gif``/``.jpeg`` (OCR-VQA) is not an error: the record gets the real path, logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from dataprocess.report import Tally
from dataprocess.schema import Record, RecordError, parse_record
from dataprocess.sources.common import iter_file

log = logging.getLogger(__name__)

BOX_RE = re.compile(r"<box>(.*?)</box>", re.DOTALL)
BOX_BODY_RE = re.compile(
    r"^\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$"
)
BOX_SCALE = 1000  # Qwen-VL boxes are integers in [0, 1000)
# Qwen's own tokens: dataset/ substitutes the image placeholder later, so none may sit in the text.
SPECIAL_TOKENS = (
    "<|extra_",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<img>",
    "</img>",
    "<imgpad>",
)
ALTERNATE_SUFFIXES = (".jpg", ".png", ".gif", ".jpeg")


@dataclass(frozen=True)
class ImageCheck:
    """What we found for one referenced image path."""

    status: str  # "ok", "fixed" (found under another extension), "missing" or "unreadable"
    path: str  # the path to write into the record (the real one when fixed)
    message: str = ""


def _decodes(path: Path) -> str:
    """Empty string when PIL can fully decode ``path``, else the reason."""
    try:
        with Image.open(path) as image:
            image.verify()  # structure check; verify() leaves the image unusable, so reopen
        with Image.open(path) as image:
            image.load()  # full decode catches truncated files and empty placeholders
            if image.width < 1 or image.height < 1:
                return "image has zero size"
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return ""


def check_image(root: Path, relative: str) -> ImageCheck:
    """Check that ``root/relative`` exists and decodes, trying other extensions by stem."""
    path = root / relative
    if not path.is_file():
        for suffix in ALTERNATE_SUFFIXES:
            candidate = path.with_suffix(suffix)
            if candidate != path and candidate.is_file():
                fixed = str(Path(relative).with_suffix(suffix))
                reason = _decodes(candidate)
                if reason:
                    return ImageCheck("unreadable", fixed, f"{candidate}: {reason}")
                return ImageCheck("fixed", fixed, f"{relative} exists as {fixed}")
        return ImageCheck("missing", relative, f"{path} does not exist")
    reason = _decodes(path)
    return (
        ImageCheck("unreadable", relative, f"{path}: {reason}")
        if reason
        else ImageCheck("ok", relative)
    )


def check_images(root: Path, paths: Iterable[str], workers: int = 8) -> dict[str, ImageCheck]:
    """Check every distinct path once, in parallel threads (the work is file I/O and decoding)."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda rel: check_image(root, rel), unique)
        return dict(zip(unique, results, strict=True))


def text_problems(record: Record) -> list[tuple[str, str]]:
    """(kind, problem) for boxes out of range or malformed and for Qwen special tokens."""
    problems: list[tuple[str, str]] = []
    for position, turn in enumerate(record.turns):
        for token in SPECIAL_TOKENS:
            if token in turn.content:
                problems.append(("special_token", f"turn {position} contains {token!r}"))
        for body in BOX_RE.findall(turn.content):
            match = BOX_BODY_RE.match(body)
            if not match:
                problems.append(
                    ("bad_box", f"turn {position}: box {body!r} is not (x1,y1),(x2,y2)")
                )
                continue
            x1, y1, x2, y2 = (int(v) for v in match.groups())
            in_range = all(0 <= v < BOX_SCALE for v in (x1, y1, x2, y2))
            if not in_range or x1 >= x2 or y1 >= y2:
                problems.append(
                    (
                        "box_out_of_range",
                        f"turn {position}: box {body!r} needs 0<=x1<x2<1000, 0<=y1<y2<1000",
                    )
                )
    return problems


def validate_records(
    records: list[Record],
    tally_of: Callable[[Record], Tally],
    image_root: Path | None,
    workers: int = 8,
) -> list[Record]:
    """Return the records that pass every check (image paths fixed); tally every fault by record."""
    checks = {}
    if image_root is not None:
        checks = check_images(image_root, (p for r in records for p in r.images), workers)
    seen: set[str] = set()
    good: list[Record] = []
    for record in records:
        tally = tally_of(record)
        problems = text_problems(record)
        if record.id in seen:
            problems.append(("duplicate_id", "the id occurs earlier in the data"))
        seen.add(record.id)
        images = list(record.images)
        for i, image in enumerate(images):
            check = checks.get(image)
            if check is None:
                continue
            tally.counts["images_" + check.status] += 1
            if check.status in ("missing", "unreadable"):
                problems.append((f"{check.status}_image", check.message))
            elif check.status == "fixed":
                tally.change("image_extension_fixed", record.id, record.source, check.message)
                images[i] = check.path
        for kind, problem in problems:
            tally.error(RecordError(problem, kind=kind, record_id=record.id, source=record.source))
        if not problems:
            good.append(replace(record, images=tuple(images)))
    return good


def validate_file(
    path: Path, image_root: Path | None, workers: int = 8
) -> tuple[list[Record], Tally]:
    """Validate one chat.json / JSONL file: schema, ids, boxes, tokens and (if a root) images."""
    tally = Tally(path.name)
    records: list[Record] = []
    for index, raw in iter_file(path, tally):
        try:
            records.append(parse_record(raw, source=str(path), index=index))
        except RecordError as exc:
            tally.error(exc)
    good = validate_records(records, lambda _record: tally, image_root, workers)
    tally.counts["valid"] = len(good)
    return good, tally
