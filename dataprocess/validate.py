"""The one record validator: what a valid record is, for ``dataprocess`` and for training alike.

A record is valid when
- it fits the schema (:func:`dataprocess.schema.parse_record`: roles, turns, ``<image>`` counts);
- its id did not occur earlier in the same stream;
- its text holds no Qwen special token and every ``<box>`` is ``(x1,y1),(x2,y2)`` in [0, 1000);
- it is of the kind the caller asks for: a training record (SFT) or a preference record (DPO,
  with ``chosen`` and ``rejected``), or either when the caller does not say;
- every image path stays inside the image folder (no absolute path, no ``..`` escape; see
  :func:`dataprocess.schema.confined_image_path`) unless that is allowed, and, when images are
  checked, the file exists and decodes fully, so a truncated image fails here and not mid-epoch.

An image listed as ``.jpg`` that exists only as ``.png``/``.gif``/``.jpeg`` (OCR-VQA) is not an
error: the record gets the real path, logged as a change. Every fault becomes an error in the
record's :class:`~dataprocess.report.Tally`, naming the record id and file; nothing is dropped
silently. Records stream through in chunks: the image paths new to a chunk are checked in
parallel threads (the work is file I/O and decoding) and each distinct path is checked once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

from PIL import Image

from dataprocess.reading import iter_raw_records
from dataprocess.report import Tally
from dataprocess.schema import Record, RecordError, confined_image_path, parse_record

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
CHUNK = 4096  # records per round of parallel image checks
# ImageCheck status -> the error kind it makes
IMAGE_ERRORS = {
    "missing": "missing_image",
    "unreadable": "unreadable_image",
    "outside": "image_outside_folder",
}


@dataclass(frozen=True)
class ImageCheck:
    """What we found for one referenced image path."""

    # "ok", "fixed" (found under another extension), "missing", "unreadable", "outside" (the
    # path leaves the image folder) or "unchecked" (confined, but the file was not opened)
    status: str
    path: str  # the path to write into the record (the real one when fixed)
    message: str = ""


def _decodes(path: Path) -> str:
    """Empty string when ``path`` decodes as training decodes it, else the reason."""
    from visual.image_io import load_image  # the one decoder (no torch: visual's towers are lazy)

    try:
        with Image.open(path) as image:
            image.verify()  # structure check; verify() leaves the image unusable, so reopen
        image = load_image(path)  # full decode catches truncated files and empty placeholders
        if image.width < 1 or image.height < 1:
            return "image has zero size"
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return ""


def check_image(
    root: Path, relative: str, *, allow_outside: bool = False, decode: bool = True
) -> ImageCheck:
    """Check that ``relative`` stays inside ``root`` and (``decode``) that the file decodes,
    trying other extensions by stem. The file checked is the one training opens."""
    try:
        path = confined_image_path(root, relative, allow_outside=allow_outside)
    except RecordError as exc:
        return ImageCheck("outside", relative, exc.problem)
    if not decode:
        return ImageCheck("unchecked", relative)
    if not path.is_file():
        for suffix in ALTERNATE_SUFFIXES:
            candidate = path.with_suffix(suffix)
            if candidate != path and candidate.is_file():
                fixed = str(Path(relative).with_suffix(suffix))
                reason = _decodes(candidate)
                if reason:
                    return ImageCheck("unreadable", fixed, f"{candidate}: {reason}")
                return ImageCheck("fixed", fixed, f"{relative} exists as {fixed}")
        return ImageCheck("missing", relative, f"image file {path} does not exist")
    reason = _decodes(path)
    if reason:
        return ImageCheck("unreadable", relative, f"image file {path} does not decode: {reason}")
    return ImageCheck("ok", relative)


def check_images(
    root: Path,
    paths: Iterable[str],
    workers: int = 8,
    *,
    allow_outside: bool = False,
    decode: bool = True,
) -> dict[str, ImageCheck]:
    """Check every distinct path once, in parallel threads when files are opened."""
    unique = sorted(set(paths))

    def check(relative: str) -> ImageCheck:
        return check_image(root, relative, allow_outside=allow_outside, decode=decode)

    if not decode or len(unique) < 2:
        return {relative: check(relative) for relative in unique}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(unique, pool.map(check, unique), strict=True))


def text_problems(record: Record) -> list[tuple[str, str]]:
    """(kind, problem) for boxes out of range or malformed and for Qwen special tokens."""
    texts = [(f"turn {position}", turn.content) for position, turn in enumerate(record.turns)]
    if record.is_preference:
        texts += [("'chosen'", record.chosen), ("'rejected'", record.rejected)]
    problems: list[tuple[str, str]] = []
    for where, text in texts:
        for token in SPECIAL_TOKENS:
            if token in text:
                problems.append(("special_token", f"{where} contains {token!r}"))
        for body in BOX_RE.findall(text):
            match = BOX_BODY_RE.match(body)
            if not match:
                problems.append(("bad_box", f"{where}: box {body!r} is not (x1,y1),(x2,y2)"))
                continue
            x1, y1, x2, y2 = (int(v) for v in match.groups())
            in_range = all(0 <= v < BOX_SCALE for v in (x1, y1, x2, y2))
            if not in_range or x1 >= x2 or y1 >= y2:
                problems.append(
                    (
                        "box_out_of_range",
                        f"{where}: box {body!r} needs 0<=x1<x2<1000, 0<=y1<y2<1000",
                    )
                )
    return problems


def kind_problem(record: Record, preference: bool | None) -> tuple[str, str] | None:
    """(kind, problem) when ``record`` is not of the kind a caller asked for (None: either)."""
    if preference is None or record.is_preference == preference:
        return None
    if preference:
        return (
            "not_a_preference_record",
            "a training record (no 'chosen'/'rejected'); DPO needs preference records",
        )
    return (
        "preference_record",
        "a preference record ('chosen'/'rejected'); train it with --training_objective dpo",
    )


class RecordValidator:
    """Checks a stream of parsed records; one instance per stream (it remembers ids and images).

    Without ``image_folder`` (or with ``check_images`` False) no file is opened, but image paths
    are still confined: an absolute or ``..`` path is invalid unless ``allow_outside``.
    ``preference`` True accepts preference records only, False training records only, None both.
    """

    def __init__(
        self,
        image_folder: str | Path | None,
        *,
        check_images: bool = True,
        allow_outside: bool = False,
        workers: int = 8,
        preference: bool | None = None,
    ) -> None:
        self.preference = preference
        self.root = Path(image_folder) if image_folder is not None else Path(".")
        self.decode = check_images and image_folder is not None
        self.allow_outside = allow_outside
        self.workers = workers
        self._seen_ids: set[str] = set()
        self._images: dict[str, ImageCheck] = {}  # LLaVA data reuses images across records

    def validate(
        self, records: Iterable[Record], tally_of: Callable[[Record], Tally]
    ) -> Iterator[Record]:
        """Yield the records that pass, in order, image paths fixed; tally every fault."""
        return self.validate_tallied((record, tally_of(record)) for record in records)

    def validate_tallied(self, pairs: Iterable[tuple[Record, Tally]]) -> Iterator[Record]:
        """:meth:`validate` for a stream that knows each record's tally (the build's sources)."""
        iterator = iter(pairs)
        while chunk := list(islice(iterator, CHUNK)):
            new = {path for record, _ in chunk for path in record.images} - self._images.keys()
            self._images.update(
                check_images(
                    self.root, new, self.workers, allow_outside=self.allow_outside,
                    decode=self.decode,
                )
            )  # fmt: skip
            for record, tally in chunk:
                good = self._check(record, tally)
                if good is not None:
                    yield good

    def _check(self, record: Record, tally: Tally) -> Record | None:
        problems = text_problems(record)
        wrong_kind = kind_problem(record, self.preference)
        if wrong_kind is not None:
            problems.append(wrong_kind)
        if record.id in self._seen_ids:
            problems.append(("duplicate_id", "the id occurs earlier in the data"))
        self._seen_ids.add(record.id)
        checks = [self._images[path] for path in record.images]
        for check in checks:
            if check.status != "unchecked":
                tally.counts["images_" + check.status] += 1
            if check.status in IMAGE_ERRORS:
                problems.append((IMAGE_ERRORS[check.status], check.message))
        for kind, problem in problems:
            tally.error(RecordError(problem, kind=kind, record_id=record.id, source=record.source))
        if problems:
            return None
        for check in checks:
            if check.status == "fixed":
                tally.change("image_extension_fixed", record.id, record.source, check.message)
        tally.counts["valid"] += 1
        return replace(record, images=tuple(check.path for check in checks))


def iter_valid_records(
    path: str | Path, tally: Tally, validator: RecordValidator
) -> Iterator[Record]:
    """Stream the valid records of one chat.json / JSONL file.

    Every record slot counts as ``read``: one that does not parse (a broken JSONL line, named by
    its line number) or fails a check is an error in ``tally`` and the records after it are still
    read. A fault of the whole file (unreadable, empty, a JSON list that does not parse) raises
    :class:`RecordError` naming the file and the position.
    """
    source = str(path)

    def unreadable_slot(exc: RecordError) -> None:
        tally.counts["read"] += 1
        tally.error(exc)

    def parsed() -> Iterator[Record]:
        for index, raw in iter_raw_records(path, on_error=unreadable_slot):
            tally.counts["read"] += 1
            try:
                yield parse_record(raw, source=source, index=index)
            except RecordError as exc:
                tally.error(exc)

    yield from validator.validate(parsed(), lambda _record: tally)


def validate_file(
    path: Path,
    image_root: Path | None,
    workers: int = 8,
    *,
    allow_outside: bool = False,
) -> tuple[Iterator[Record], Tally]:
    """Validate one file (``python -m dataprocess validate``): the good records as they are
    checked, and the tally, which is complete once the records are exhausted."""
    tally = Tally(path.name)
    tally.counts.update(read=0, valid=0)
    validator = RecordValidator(image_root, allow_outside=allow_outside, workers=workers)
    return iter_valid_records(path, tally, validator), tally
