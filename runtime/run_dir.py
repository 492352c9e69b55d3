"""The output directory of a training run: one run at a time, and never another run's leftovers.

A run's directory fills with `checkpoint-N/` directories and, at the end, the trained weights. A
second run started into the same directory would replace some of them (its own `checkpoint-2`)
and keep others (the old run's `checkpoint-4`), and `--resume_from_checkpoint latest` would then
continue the old run. So `claim_output_dir`, before anything is written:

- locks the directory (an exclusive POSIX record lock on `.train.lock`, held for the whole run by
  the first process, `RANK` 0 under torchrun, never by its loader workers), so a concurrent run
  into it stops at once, naming the process that holds the lock;
- refuses a directory that holds another run's checkpoints or trained weights, unless this run
  resumes one of its checkpoints exactly, or `--overwrite_output_dir` asks to delete them first.

`train_config.yaml` and `vlm_config.json` alone (a run that died before its first save) do not
make a directory another run's: every run writes them at its start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

from model.checkpoint import ADAPTER_DIR, LLM_DIR, PROJECTOR_FILE
from runtime.config import TrainingConfig
from runtime.resume import resolve_resume

logger = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t)
_FLOCK = "hhqqi"
_CHECKPOINT = re.compile(r"^(tmp-)?checkpoint-\d+$")
# What a run writes besides its checkpoints; `--overwrite_output_dir` deletes these too, so a new
# run that dies early cannot leave the old run's final weights next to its own config
_RUN_OUTPUTS = (PROJECTOR_FILE, ADAPTER_DIR, LLM_DIR, "training_args.bin", "loss.png")


def previous_run(out: Path) -> list[str]:
    """Names in `out` that another run left: complete checkpoints and final trained weights."""
    if not out.is_dir():
        return []
    names = [p.name for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    checkpoints = sorted((n for n in names if not n.startswith("tmp-")), key=_step)
    return checkpoints + ([PROJECTOR_FILE] if (out / PROJECTOR_FILE).is_file() else [])


def _step(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _lock_holder(handle) -> int | None:
    """The pid holding a conflicting lock on `handle`'s file (F_GETLK asks the kernel), or None."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    answer = struct.unpack(_FLOCK, fcntl.fcntl(handle, fcntl.F_GETLK, query))
    return answer[4] if answer[0] != fcntl.F_UNLCK else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on `out` until the block ends.

    A POSIX record lock (`lockf`): it belongs to this process alone - the DataLoader workers it
    forks do not inherit it (an `flock` they would share, and hold after a kill -9 of the run
    until they notice) - and the kernel drops it when the process dies, so a killed run never
    leaves a stale lock. Closing any descriptor of the lock file drops it too: only this one opens
    it."""
    path = out / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held across the yield
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = _lock_holder(handle)
            who = f"pid {holder}" if holder and _alive(holder) else "a process"
            raise ValueError(
                f"--output_dir {out}: another training run ({who}) is writing into it; "
                "wait for it to finish or choose another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))  # for people; the lock itself names its holder
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _check_not_another_run(out: Path, training: TrainingConfig, resume: str | None) -> None:
    """Refuse `out` if it holds another run's outputs that this run would mix with its own."""
    resumes_here = resume is not None and Path(resume).resolve().parent == out.resolve()
    if training.overwrite_output_dir:
        if resumes_here:
            raise ValueError(
                f"--overwrite_output_dir would delete {resume}, which --resume_from_checkpoint "
                "resumes; pass one of the two"
            )
        return
    left = previous_run(out)
    if not left or (resumes_here and not training.resume_weights_only):
        return
    if resumes_here:  # weights only: a new run from step 0, whose checkpoints would mix
        raise ValueError(
            f"--resume_weights_only starts a new run at step 0, whose checkpoints would mix with "
            f"the ones in --output_dir {out} ({', '.join(left)}); choose a new --output_dir"
        )
    raise ValueError(
        f"--output_dir {out}: holds another run's outputs ({', '.join(left)}); resume it with "
        "--resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes them), "
        "or choose another directory"
    )


def _delete_previous_run(out: Path) -> None:
    doomed = [p for p in out.iterdir() if p.name in _RUN_OUTPUTS or _CHECKPOINT.match(p.name)]
    for path in sorted(doomed):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if doomed:
        names = ", ".join(p.name for p in sorted(doomed))
        logger.warning("--overwrite_output_dir: deleted the previous run's %s from %s", names, out)


def _warn_newer_checkpoints(out: Path, resume: str) -> None:
    """Resuming an older checkpoint of this directory replaces the newer ones as it reaches them."""
    name = Path(resume).name
    if Path(resume).resolve().parent != out.resolve() or not _CHECKPOINT.match(name):
        return
    newer = [n for n in previous_run(out) if n.startswith("checkpoint-")]
    newer = [n for n in newer if _step(n) > _step(name)]
    if newer:
        logger.warning(
            "resuming %s although %s %s newer: this run replaces %s as it reaches %s",
            resume,
            ", ".join(newer),
            *(("is", "it", "its step") if len(newer) == 1 else ("are", "them", "their steps")),
        )


@contextlib.contextmanager
def claim_output_dir(training: TrainingConfig, rank: int = 0) -> Iterator[str | None]:
    """Locks `training.output_dir` for this run (rank 0) and checks that it may write there;
    yields the checkpoint to resume (`latest` resolved), or None to start fresh."""
    out = Path(training.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = _exclusive_lock(out) if rank == 0 else contextlib.nullcontext()
    with lock:
        resume = resolve_resume(training)
        _check_not_another_run(out, training, resume)
        if training.overwrite_output_dir and rank == 0:
            _delete_previous_run(out)
        if resume is not None and rank == 0:
            _warn_newer_checkpoints(out, resume)
        yield resume
