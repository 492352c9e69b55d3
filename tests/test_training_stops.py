"""A training run stopped by a full disk or Ctrl-C during a save: one line naming what failed and
the intact checkpoint, a non-zero exit, and no partial save left behind. `train.py` runs in a
subprocess whose weight writes fail on cue (`safetensors.torch.save_file` patched before any
import, so the adapter and projector writers of peft and model/ get the failing one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_training_runs import flags

from runtime.stopping import write_failure

REPO = Path(__file__).resolve().parent.parent
# Writes half a file, then fails as the disk (or the user) would, when the path names `cue`.
FAILING_WRITER = """
import errno, runpy, sys
import safetensors.torch

cue, failure = sys.argv.pop(1), sys.argv.pop(1)
original = safetensors.torch.save_file

def save_file(tensors, filename, *args, **kwargs):
    if cue in str(filename):
        with open(filename, "wb") as file:
            file.write(b"half a tensor")
        if failure == "disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt
    return original(tensors, filename, *args, **kwargs)

safetensors.torch.save_file = save_file
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def _train(argv: list[str], cue: str, failure: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", FAILING_WRITER, cue, failure, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture
def run_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir):
    def make(out, **extra):
        data = shapes_dir / "train.json"
        return flags(tiny_qwen_dir, tiny_clip_dir, data, shapes_dir, out, **extra)

    return make


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if " ERROR " in line]
    return line


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save(run_flags, tmp_path):
    out = tmp_path / "run"
    done = _train(run_flags(out, max_steps=6, save_steps=2), "tmp-checkpoint-4", "disk")
    line = _error_line(done)
    assert done.returncode == 1
    assert "could not write: No space left on device while saving checkpoint-4" in line
    assert f"the last complete checkpoint, {out / 'checkpoint-2'}, is intact" in line
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and not [n for n in names if "checkpoint-4" in n]
    assert "projector.safetensors" not in names  # nothing looks like a finished run
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_a_full_disk_while_saving_the_trained_weights(run_flags, tmp_path):
    out = tmp_path / "run"
    done = _train(run_flags(out, max_steps=2, save_steps=2), "tmp-final", "disk")
    line = _error_line(done)
    assert done.returncode == 1
    assert f"while saving the trained weights into {out}" in line
    assert "checkpoint-2" in line and "is intact" in line
    names = sorted(p.name for p in out.iterdir())
    assert "tmp-final" not in names and "projector.safetensors" not in names


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_save(run_flags, tmp_path):
    out = tmp_path / "run"
    done = _train(run_flags(out, max_steps=4, save_steps=2), "tmp-checkpoint-2", "interrupt")
    line = _error_line(done)
    assert done.returncode == 130
    assert "interrupted (Ctrl-C) while saving checkpoint-2" in line
    assert "no checkpoint had been saved yet" in line
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]


def test_write_failures_are_told_from_other_errors():
    torch_text = "PytorchStreamWriter failed writing file data/0: file write failed"
    assert write_failure(RuntimeError(torch_text)) == "file write failed"
    rust_text = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert write_failure(RuntimeError(rust_text)) == "No space left on device"
    assert write_failure(OSError(122, "Disk quota exceeded", "x.pt")).endswith("(x.pt)")
    assert write_failure(FileNotFoundError(2, "No such file or directory")) is None
    assert write_failure(ValueError("a user mistake")) is None
