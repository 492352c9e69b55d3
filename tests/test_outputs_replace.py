"""Replacing an output (`--overwrite`): a kill -9 at any point leaves the whole old or the whole
new output, never neither; leftovers of killed runs are cleaned; a command never replaces what it
reads (`runtime/outputs.py`, `runtime.merge`, `runtime.export`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_identity import trained  # noqa: F401 - a fixture

from runtime.export import export_checkpoint
from runtime.export.gguf_export import export_gguf
from runtime.merge import merge_checkpoint
from runtime.outputs import check_destination

REPO = Path(__file__).resolve().parents[1]
KILLED_WHILE_REPLACING = """
import os, signal, sys
from pathlib import Path
from runtime import outputs

out, mode, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if mode == "rename":  # a file system without renameat2's exchange
    outputs._exchange = lambda first, second: False
with outputs.atomic_directory(out, overwrite=True, flag="OUT") as staging:
    (staging / "weights").write_text("new")
    if point == "writing":
        die()
    if point == "in_place":  # the new output is in place; the old one not yet deleted
        outputs.shutil.rmtree = die
    if point == "aside":  # the old output renamed aside, the new one not yet in place
        real = os.replace
        outputs.os.replace = lambda a, b: (real(a, b), die())
"""


@pytest.mark.parametrize(
    ("mode", "point", "left"),
    [("exchange", "writing", "old"), ("exchange", "in_place", "new"),
     ("rename", "writing", "old"), ("rename", "aside", "old"), ("rename", "in_place", "new")],
)  # fmt: skip
def test_a_kill_at_any_point_of_a_replacement_leaves_a_whole_output(tmp_path, mode, point, left):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_REPLACING, str(out), mode, point],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    check_destination(out, overwrite=True, flag="OUT")  # what the next run does first
    assert (out / "weights").read_text() == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # leftovers cleaned


def test_a_leftover_of_a_live_process_is_named_not_deleted(tmp_path, caplog):
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    with caplog.at_level(logging.WARNING):
        check_destination(tmp_path / "out", overwrite=True, flag="OUT")
    assert live.is_dir() and f"left by process {os.getppid()}, which still runs" in caplog.text


def _export_gguf(checkpoint, out, dtype, **kwargs):
    return export_gguf(checkpoint, out, outtype="f32", **kwargs)


@pytest.mark.parametrize("command", [merge_checkpoint, export_checkpoint, _export_gguf])
def test_an_output_that_holds_or_is_the_source_is_refused(trained, tmp_path, command):  # noqa: F811
    run = tmp_path / "run"
    checkpoint = Path(shutil.copytree(trained, run / "checkpoint-2"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out, said in ((run, "holds the checkpoint"), (checkpoint, "is the checkpoint")):
        with pytest.raises(ValueError, match=f"OUT_DIR {out}: {said} {checkpoint}"):
            command(checkpoint, out, overwrite=True, dtype="float32")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    merged = merge_checkpoint(checkpoint, tmp_path / "merged", dtype="float32")
    with pytest.raises(ValueError, match="holds the base language model"):
        command(checkpoint, merged, overwrite=True, dtype="float32",
                language_model=str(merged / "language_model"), allow_other_base=True)  # fmt: skip
    assert (merged / "language_model" / "config.json").is_file()
