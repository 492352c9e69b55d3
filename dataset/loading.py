"""chat.json / JSONL records -> a validated, memory-mapped `datasets.Dataset`, before training.

Every record is parsed with `dataprocess.schema.parse_record`; ids must be unique; with an image
folder, every image must exist and open as an image (header only, cheap). All problems are
collected first, then either one ValueError lists them (counts per kind + examples naming id
and file) or, with `skip_invalid`, the bad records are skipped, counted and logged.

The good records are written once to an Arrow file in a cache directory keyed by the file's
path, size and mtime (plus the image folder and checks), and read back with `Dataset.from_file`:
memory-mapped, so DataLoader workers share the OS page cache instead of each holding a copy of
a 665K-record list. The validation summary is cached next to it, so a second load neither
re-parses the file nor re-opens the images. Columns: id, images, roles, contents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from dataprocess.schema import Record, RecordError, iter_raw_records, parse_record

logger = logging.getLogger(__name__)

# Bump when the cached columns or the checks change, so stale caches are rebuilt.
CACHE_VERSION = 1
MAX_EXAMPLES = 10
_WRITE_BATCH = 10_000

RECORD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "roles": datasets.List(datasets.Value("string")),
        "contents": datasets.List(datasets.Value("string")),
    }
)


@dataclass
class ValidationSummary:
    """What validation found in one records file."""

    source: str
    total: int = 0  # records in the file
    kept: int = 0
    problem_counts: dict[str, int] = field(default_factory=dict)  # kind -> records
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (id, file, problem)

    @property
    def num_invalid(self) -> int:
        return self.total - self.kept

    def describe(self) -> str:
        """A multi-line report: counts per kind, then up to MAX_EXAMPLES examples."""
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.problem_counts.items()))
        lines = [
            f"{self.num_invalid} of {self.total} records in {self.source} are invalid ({counts})"
        ]
        lines += [f"  record {rid!r} in {file}: {problem}" for rid, file, problem in self.examples]
        return "\n".join(lines)


def _image_problem(path: Path) -> str | None:
    """None if `path` opens as an image (header only), else why not."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header parse is the check
    except FileNotFoundError:
        return f"image file not found: {path}"
    except (UnidentifiedImageError, OSError) as exc:
        return f"image file {path} does not open as an image: {exc}"
    return None


class _Validator:
    """Collects problems record by record; keeps the first MAX_EXAMPLES as examples."""

    def __init__(self, source: str, image_folder: Path | None) -> None:
        self.summary = ValidationSummary(source=source)
        self.image_folder = image_folder
        self._seen_ids: set[str] = set()
        self._checked_images: dict[str, str | None] = {}  # LLaVA data reuses images
        self._counts: Counter[str] = Counter()

    def _problem(self, record_id: str, kind: str, problem: str) -> None:
        self._counts[kind] += 1
        if len(self.summary.examples) < MAX_EXAMPLES:
            self.summary.examples.append((record_id, self.summary.source, problem))

    def check(self, index: int, raw: dict) -> Record | None:
        """The parsed record, or None after recording why it is invalid."""
        self.summary.total += 1
        try:
            record = parse_record(raw, source=self.summary.source, index=index)
        except RecordError as exc:
            record_id = exc.record_id if exc.record_id is not None else f"<index {index}>"
            self._problem(record_id, exc.kind, exc.problem)
            return None
        if record.id in self._seen_ids:
            self._problem(record.id, "duplicate_id", f"id {record.id!r} appears more than once")
            return None
        self._seen_ids.add(record.id)
        if self.image_folder is not None:
            for image in record.images:
                if image not in self._checked_images:
                    self._checked_images[image] = _image_problem(self.image_folder / image)
                problem = self._checked_images[image]
                if problem is not None:
                    self._problem(record.id, "bad_image", problem)
                    return None
        self.summary.kept += 1
        return record

    def finish(self) -> ValidationSummary:
        self.summary.problem_counts = dict(self._counts)
        return self.summary


def _columns(records: list[Record]) -> dict[str, list]:
    return {
        "id": [r.id for r in records],
        "images": [list(r.images) for r in records],
        "roles": [[t.role for t in r.turns] for r in records],
        "contents": [[t.content for t in r.turns] for r in records],
    }


def _validate_and_write(
    path: Path, image_folder: Path | None, arrow_path: Path
) -> ValidationSummary:
    """Stream the good records into `arrow_path` (Arrow IPC stream, as `datasets` writes)."""
    validator = _Validator(str(path), image_folder)
    schema = RECORD_FEATURES.arrow_schema
    pending: list[Record] = []
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for index, raw in iter_raw_records(path):
            record = validator.check(index, raw)
            if record is not None:
                pending.append(record)
            if len(pending) >= _WRITE_BATCH:
                writer.write_batch(pa.RecordBatch.from_pydict(_columns(pending), schema=schema))
                pending.clear()
        if pending:
            writer.write_batch(pa.RecordBatch.from_pydict(_columns(pending), schema=schema))
    return validator.finish()


def default_cache_dir() -> Path:
    """Where record caches go when no cache_dir is given: under the `datasets` cache."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "vlm_records"


def records_cache_key(path: Path, image_folder: Path | None) -> str:
    """Hash of everything the cached records depend on (file identity, not its contents)."""
    stat = path.stat()
    parts = [str(CACHE_VERSION), str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    parts.append(str(image_folder.resolve()) if image_folder is not None else "-")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cached_validation(path: Path, folder: Path | None, entry: Path) -> ValidationSummary:
    """Validate `path` into the cache directory `entry`, or read back what an earlier run wrote."""
    arrow_path, summary_path = entry / "records.arrow", entry / "validation.json"
    if summary_path.is_file() and arrow_path.is_file():
        summary = ValidationSummary(**json.loads(summary_path.read_text(encoding="utf-8")))
        summary.examples = [tuple(e) for e in summary.examples]
        logger.info("records of %s loaded from cache %s", path, entry)
    else:
        entry.mkdir(parents=True, exist_ok=True)
        partial = entry / f"records.arrow.{os.getpid()}.tmp"
        partial_summary = entry / f"validation.json.{os.getpid()}.tmp"
        try:
            summary = _validate_and_write(path, folder, partial)
            partial_summary.write_text(json.dumps(asdict(summary), ensure_ascii=False), "utf-8")
            # Atomic renames: a crash, or another rank loading the same file, never sees a
            # half-written cache. The summary goes last since its presence marks completion.
            os.replace(partial, arrow_path)
            os.replace(partial_summary, summary_path)
        finally:
            partial.unlink(missing_ok=True)
            partial_summary.unlink(missing_ok=True)
    return summary


def load_records(
    path: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, ValidationSummary]:
    """Validate a chat.json / .jsonl file and return its good records as a memory-mapped Dataset.

    Raises ValueError listing counts per problem kind and examples (id, file, problem) when any
    record is invalid and `skip_invalid` is False; file-level faults (unreadable, invalid JSON,
    not a list, empty) raise `RecordError` naming the file. Images are checked only when
    `image_folder` is given and `check_images` is True. The cache is keyed by the file's path,
    size and mtime: touch the file (or delete the cache) after replacing images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file not found: {path}")
    folder = Path(image_folder) if image_folder is not None and check_images else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (for records file {path})")
    entry = Path(cache_dir or default_cache_dir()) / f"records-{records_cache_key(path, folder)}"
    summary = _cached_validation(path, folder, entry)
    if summary.num_invalid:
        if not skip_invalid:
            raise ValueError(summary.describe() + "\n(fix the records or pass skip_invalid)")
        logger.warning("skipping invalid records:\n%s", summary.describe())
    dataset = datasets.Dataset.from_file(str(entry / "records.arrow"))
    logger.info("%d records from %s", len(dataset), path)
    return dataset, summary
