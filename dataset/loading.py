"""chat.json / JSONL records -> a validated, memory-mapped `datasets.Dataset`, before training.

What a valid record is has one owner, `dataprocess.validate` (the same checks as
`python -m dataprocess validate`: schema, unique ids, no Qwen special tokens, boxes in range,
image paths inside the image folder, images that exist and fully decode). Its report, a
`dataprocess.report.Tally`, is this loader's report too. With any invalid record, one ValueError
lists them (counts per kind + examples naming id and file), or, with `skip_invalid`, they are
skipped, counted and logged. A file without a single valid record is always an error.

The good records stream into an Arrow file in a cache directory keyed by the file's path, size
and mtime (plus the image folder and the checks), read back with `Dataset.from_file`:
memory-mapped, so DataLoader workers share the OS page cache instead of each holding a copy of
a 665K-record list. The report is cached next to it, so a second load neither re-parses the
file nor re-decodes the images. Columns: id, images (paths as validated), roles, contents, and
chosen / rejected (null for training records). `preference` asks for one kind of record: a record
of the other kind is invalid, named like any other fault.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import pyarrow as pa

from dataprocess.report import Tally
from dataprocess.schema import Record
from dataprocess.validate import RecordValidator, iter_valid_records

logger = logging.getLogger(__name__)

# Bump when the cached columns or the checks change, so stale caches are rebuilt.
CACHE_VERSION = 3
_WRITE_BATCH = 10_000

RECORD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "roles": datasets.List(datasets.Value("string")),
        "contents": datasets.List(datasets.Value("string")),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
    }
)


def _columns(records: list[Record]) -> dict[str, list]:
    return {
        "id": [r.id for r in records],
        "images": [list(r.images) for r in records],
        "roles": [[t.role for t in r.turns] for r in records],
        "contents": [[t.content for t in r.turns] for r in records],
        "chosen": [r.chosen for r in records],
        "rejected": [r.rejected for r in records],
    }


def _validate_and_write(path: Path, validator: RecordValidator, arrow_path: Path) -> Tally:
    """Stream the good records into `arrow_path` (Arrow IPC stream, as `datasets` writes)."""
    tally = Tally(str(path))
    tally.counts.update(read=0, valid=0)
    schema = RECORD_FEATURES.arrow_schema
    pending: list[Record] = []
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for record in iter_valid_records(path, tally, validator):
            pending.append(record)
            if len(pending) >= _WRITE_BATCH:
                writer.write_batch(pa.RecordBatch.from_pydict(_columns(pending), schema=schema))
                pending.clear()
        if pending:
            writer.write_batch(pa.RecordBatch.from_pydict(_columns(pending), schema=schema))
    return tally


def default_cache_dir() -> Path:
    """Where record caches go when no cache_dir is given: under the `datasets` cache."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "vlm_records"


def records_cache_key(
    path: Path,
    image_folder: Path | None,
    allow_outside: bool = False,
    preference: bool | None = False,
) -> str:
    """Hash of everything the cached records depend on (file identity, not its contents)."""
    stat = path.stat()
    parts = [str(CACHE_VERSION), str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    parts.append(str(image_folder.resolve()) if image_folder is not None else "-")
    parts.append(f"allow_outside={allow_outside}")
    parts.append(f"preference={preference}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cached_validation(path: Path, validator: RecordValidator, entry: Path) -> Tally:
    """Validate `path` into the cache directory `entry`, or read back what an earlier run wrote."""
    arrow_path, report_path = entry / "records.arrow", entry / "validation.json"
    if report_path.is_file() and arrow_path.is_file():
        logger.info("records of %s loaded from cache %s", path, entry)
        return Tally.from_json(json.loads(report_path.read_text(encoding="utf-8")))
    entry.mkdir(parents=True, exist_ok=True)
    partial = entry / f"records.arrow.{os.getpid()}.tmp"
    partial_report = entry / f"validation.json.{os.getpid()}.tmp"
    try:
        tally = _validate_and_write(path, validator, partial)
        partial_report.write_text(json.dumps(tally.to_json(), ensure_ascii=False), "utf-8")
        # Atomic renames: a crash, or another rank loading the same file, never sees a
        # half-written cache. The report goes last since its presence marks completion.
        os.replace(partial, arrow_path)
        os.replace(partial_report, report_path)
    finally:
        partial.unlink(missing_ok=True)
        partial_report.unlink(missing_ok=True)
    return tally


def _check_report(tally: Tally, path: Path, skip_invalid: bool) -> None:
    """Raise for no valid record at all, or for any invalid one unless `skip_invalid`."""
    if tally.counts["valid"] == 0:
        if tally.counts["read"] == 0:
            raise ValueError(f"no records in {path}: the file holds an empty list")
        raise ValueError(f"no valid records in {path}:\n{tally.describe()}")
    if tally.num_invalid:
        if not skip_invalid:
            raise ValueError(
                tally.describe() + "\n(fix the records, or pass --skip_invalid to train without "
                "them; `python -m dataprocess validate --drop_invalid` writes the good ones)"
            )
        logger.warning("skipping invalid records:\n%s", tally.describe())


def load_records(
    path: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_images: bool = True,
    allow_outside_image_folder: bool = False,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 8,
    preference: bool | None = False,
) -> tuple[datasets.Dataset, Tally]:
    """Validate a chat.json / .jsonl file and return its good records as a memory-mapped Dataset.

    Raises ValueError listing counts per problem kind and examples (id, file, problem) when any
    record is invalid and `skip_invalid` is False, and always when no record is valid;
    file-level faults (unreadable, a JSON list that does not parse, not a list, empty) raise
    `RecordError` naming the file. Images are opened only when `image_folder` is given and
    `check_images` is True; their paths are confined to the folder either way unless
    `allow_outside_image_folder`. `preference` False (SFT) accepts training records only, True
    (DPO) preference records only, None both. The cache is keyed by the file's path, size and mtime: touch
    the file (or delete the cache) after replacing images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file not found: {path}")
    folder = Path(image_folder) if image_folder is not None and check_images else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (for records file {path})")
    validator = RecordValidator(
        image_folder,
        check_images=check_images,
        allow_outside=allow_outside_image_folder,
        workers=workers,
        preference=preference,
    )
    key = records_cache_key(path, folder, allow_outside_image_folder, preference)
    entry = Path(cache_dir or default_cache_dir()) / f"records-{key}"
    tally = _cached_validation(path, validator, entry)
    _check_report(tally, path, skip_invalid)
    dataset = datasets.Dataset.from_file(str(entry / "records.arrow"))
    logger.info("%d records from %s", len(dataset), path)
    return dataset, tally
