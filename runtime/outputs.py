"""Writing results so that an interrupted command leaves nothing half-written or clobbered.

`check_destination` runs before any work (a mistake in the destination costs nothing);
`atomic_directory` builds the output in a hidden sibling directory and renames it into place only
once it is complete, so the destination is either absent, the old one, or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_destination(path: str | Path, *, overwrite: bool, flag: str) -> Path:
    """Refuse a destination that is a file, or a non-empty directory unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"{flag} {path}: the directory is not empty; choose another one or pass --overwrite "
            "to replace it"
        )
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file path that is a directory or whose parent cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool, flag: str) -> Iterator[Path]:
    """Yields a staging directory; on success it replaces `path`, on failure it is removed."""
    final = check_destination(path, overwrite=overwrite, flag=flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole file through a temporary sibling, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
