"""A training run that stops on a full disk, another failed write, or Ctrl-C: one line saying what
failed, where, and what is intact; nothing half-written left that looks complete.

Checkpoints are written to `tmp-checkpoint-N/` and renamed when whole (`runtime/trainer.py`), and
the trained weights to `tmp-final/`, moved into the run directory with `vlm_config.json` last
(`save_final`): a save cut short leaves only a `tmp-` directory, which nothing reads as a
checkpoint, and `explained_stops` deletes it (it can be gigabytes on a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

FINAL_STAGING = "tmp-final"
_PARTIAL = re.compile(r"^tmp-(checkpoint-\d+|final)$")
_COMPLETE = re.compile(r"^checkpoint-(\d+)$")
# errno values that mean "the disk would not take the bytes", not "the input is wrong"
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
# torch.save and safetensors report a failed write as RuntimeError / SafetensorError text
_WRITE_TEXTS = (*(os.strerror(code) for code in _WRITE_ERRNOS), "file write failed")


class TrainingStopped(RuntimeError):
    """The run stopped before its end; the message is the one line to show, `exit_code` the
    status to exit with (130 for Ctrl-C, as a shell reports SIGINT; 1 for a failed write)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def save_final(trainer, out: Path) -> None:
    """The trained weights into `out` through `out/tmp-final/`, moved in with `vlm_config.json`
    (what makes a directory a loadable checkpoint) last. Every rank calls it (engines gather)."""
    staging = out / FINAL_STAGING
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)  # left by a killed run
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    from model.checkpoint import VLM_CONFIG

    for path in sorted(staging.iterdir(), key=lambda p: p.name == VLM_CONFIG):
        target = out / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)  # a rename: the disk cannot fill up here
    staging.rmdir()


def write_failure(error: BaseException) -> str | None:
    """Why `error` is a failed write (a full disk, a quota, a read-only or failing disk), or None
    when it is something else. torch and safetensors wrap the OS error in their own text."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        path = error.filename2 or error.filename  # a failed copy names (source, destination)
        return os.strerror(error.errno) + (f" ({path})" if path else "")
    text = str(error)
    return next((reason for reason in _WRITE_TEXTS if reason in text), None)


@contextlib.contextmanager
def explained_stops(out: Path, rank: int = 0) -> Iterator[None]:
    """Turns Ctrl-C and failed writes inside the block into `TrainingStopped` (see module doc)."""
    try:
        yield
    except KeyboardInterrupt:
        message = f"interrupted (Ctrl-C){_cleanup(out, rank)}; {_intact(out, 'resume with')}"
        raise TrainingStopped(message, 130) from None
    except Exception as error:
        reason = write_failure(error)
        if reason is None:
            raise
        where = _cleanup(out, rank)  # else the reason names the file, where the error does
        intact = _intact(out, "free some space, then resume with")
        raise TrainingStopped(f"could not write: {reason}{where}; {intact}", 1) from error


def _cleanup(out: Path, rank: int) -> str:
    """Delete the partial saves in `out` (first process only); ' while saving X' or ''.

    A checkpoint stopped between its last write (`trainer_state.json`) and its rename is whole:
    it is renamed instead, since the Trainer may already have deleted the older copy of it."""
    partial = sorted(p for p in out.glob("tmp-*") if p.is_dir() and _PARTIAL.match(p.name))
    if rank == 0:
        for path in partial:
            final = out / path.name.removeprefix("tmp-")
            whole = path.name != FINAL_STAGING and (path / "trainer_state.json").is_file()
            if whole and not final.exists():
                os.replace(path, final)
                continue
            shutil.rmtree(path, ignore_errors=True)
    if not partial:
        return ""
    names = [p.name.removeprefix("tmp-") for p in partial]
    what = ", ".join(f"the trained weights into {out}" if n == "final" else n for n in names)
    return f" while saving {what} (its partial files are deleted)"


def _intact(out: Path, how: str) -> str:
    steps = [int(m[1]) for p in out.glob("checkpoint-*") if (m := _COMPLETE.match(p.name))]
    if not steps:
        return "no checkpoint had been saved yet, so there is nothing to resume"
    last = out / f"checkpoint-{max(steps)}"
    return f"the last complete checkpoint, {last}, is intact: {how} --resume_from_checkpoint latest"
