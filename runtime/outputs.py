"""Writing results so that an interrupted command leaves nothing half-written or clobbered.

`check_destination` runs before any work (a mistake in the destination costs nothing);
`check_not_a_source` refuses a destination whose replacement would delete what the command reads;
`atomic_directory` builds the output in a hidden sibling directory (`.NAME.partial-PID`) and puts
it in place only once it is complete, swapping it with an old output in one atomic step
(`renameat2(RENAME_EXCHANGE)`; where the file system lacks it, the old one is renamed aside to
`.NAME.old-PID` first and put back by the next run if a kill came between). So after a kill -9 at
any point the destination is absent, the whole old one or the whole new one. Leftovers of killed
runs are removed by the next run into the same destination (or named, while their process lives).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def check_destination(path: str | Path, *, overwrite: bool, flag: str) -> Path:
    """Refuse a destination that is a file, or a non-empty directory unless `overwrite` (after
    tidying what killed runs into it left)."""
    path = Path(path)
    _clean_leftovers(path)
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


def check_not_a_source(
    out: str | Path, sources: Mapping[str, str | Path | None], flag: str
) -> None:
    """Refuse `out` when replacing it would delete one of `sources` ({what: path}; hub ids and
    missing paths are skipped): `out` is a source, or holds one (a run directory holding the
    checkpoint, a merged directory holding the base LLM read)."""
    out = Path(out).resolve()
    for what, source in sources.items():
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if source == out or out in source.parents:
            raise ValueError(
                f"{flag} {out}: {'is' if source == out else 'holds'} {what} {source}, which this "
                "command reads (replacing it would delete it); choose another directory"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(final: Path) -> None:
    """Remove what killed runs into `final` left (`.NAME.partial-PID`, `.NAME.old-PID`); an old
    output renamed aside whose replacement never arrived is put back."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(partial|old)-(\d+)$")
    for path in sorted(final.parent.iterdir()) if final.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match is None:
            continue
        if _alive(int(match[2])):
            logger.warning("%s: left by process %s, which still runs; not touched", path, match[2])
        elif match[1] == "old" and not final.exists():
            os.replace(path, final)
            logger.warning("restored %s from %s (a replacement was killed midway)", final, path)
        else:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            logger.warning("removed %s, left by a killed run (pid %s)", path, match[2])


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step; False where the kernel or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    paths = (os.fsencode(first), os.fsencode(second))
    if renameat2(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first))


def _put_in_place(staging: Path, final: Path) -> None:
    """`staging` becomes `final`; an old `final` is deleted only once the new one is there."""
    if not final.exists():
        os.replace(staging, final)
        return
    if _exchange(staging, final):
        shutil.rmtree(staging)  # now the old output
        return
    aside = final.parent / f".{final.name}.old-{os.getpid()}"
    os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside)


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
    _put_in_place(staging, final)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole file through a temporary sibling, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
