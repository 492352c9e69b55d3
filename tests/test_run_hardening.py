"""Training runs never clobber, resume exactly or refuse, and fail with one line naming the cause.

Most refusals happen before a model loads, so these tests point --language_model at nothing and
forge checkpoints from small files: a check that failed to refuse would stop at the missing model
with another message. The tests that train or start `train.py` are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import truncate
from safetensors.torch import save_file

import train
from model.checkpoint import CheckpointError
from runtime.config import save_config
from runtime.resume import check_resume, load_torch_state
from runtime.run_dir import LOCK_FILE, claim_output_dir

REPO = Path(__file__).resolve().parent.parent
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def flags(out, language_model="no-such-llm", vision_model="no-such-tower", **extra) -> list[str]:
    settings = {
        "language_model": language_model, "vision_model": vision_model, "dtype": "float32",
        "model_max_length": 128, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "output_dir": out, "report_to": "none", "dataloader_num_workers": 0,
        "per_device_train_batch_size": 2, "logging_steps": 1, "seed": 7, **extra,
    }  # fmt: skip
    switches = [f"--{key}" for key, value in settings.items() if value is True]
    values = {key: value for key, value in settings.items() if value is not True}
    return switches + [item for key, value in values.items() for item in (f"--{key}", str(value))]


def forge_checkpoint(checkpoint: Path, argv: list[str]) -> Path:
    """Every file an exact resume reads, valid but tiny, with the settings of `argv`."""
    (checkpoint / "adapter").mkdir(parents=True)
    save_config(train.parse_args(argv), checkpoint / "train_config.yaml")
    save_file({"weight": torch.zeros(2, 2)}, checkpoint / "projector.safetensors")
    save_file({"lora_A": torch.zeros(2)}, checkpoint / "adapter" / "adapter_model.safetensors")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.arange(2000.0)}, checkpoint / name)
    return checkpoint


@pytest.fixture
def forged(tmp_path) -> Path:
    """An output dir holding one complete (forged) checkpoint: checkpoint-2."""
    out = tmp_path / "run"
    forge_checkpoint(out / "checkpoint-2", flags(out))
    return out


# --- the output directory ---------------------------------------------------------------------


def test_a_dir_with_another_runs_checkpoints_is_refused(forged, tmp_path):
    (forged / "checkpoint-4").mkdir()
    with pytest.raises(ValueError, match=r"another run's outputs \(checkpoint-2, checkpoint-4\)"):
        train.main(flags(forged))
    elsewhere = forge_checkpoint(tmp_path / "elsewhere" / "checkpoint-6", flags(forged))
    with pytest.raises(ValueError, match="another run's outputs"):  # resuming another run into it
        train.main(flags(forged, resume_from_checkpoint=elsewhere))
    (forged / "checkpoint-4").rmdir()
    forge_checkpoint(forged.parent / "done", flags(forged))  # final weights, checkpoints pruned
    with pytest.raises(ValueError, match=r"another run's outputs \(projector.safetensors\)"):
        train.main(flags(forged.parent / "done"))


def test_the_config_files_alone_do_not_make_a_dir_another_runs(tmp_path):
    config = train.parse_args(flags(tmp_path))
    save_config(config, tmp_path / "train_config.yaml")
    (tmp_path / "vlm_config.json").write_text("{}")
    with claim_output_dir(config.training) as resume:
        assert resume is None


def test_resuming_the_dir_is_allowed_and_latest_is_its_newest_checkpoint(forged):
    forge_checkpoint(forged / "checkpoint-10", flags(forged))
    (forged / "tmp-checkpoint-12").mkdir()  # a save that was killed: not a checkpoint
    config = train.parse_args(flags(forged, resume_from_checkpoint="latest"))
    with claim_output_dir(config.training) as resume:
        assert Path(resume).name == "checkpoint-10"
        check_resume(config, resume)  # complete, same settings: exact


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"resume_from_checkpoint": "latest"}, "--overwrite_output_dir would delete"),
        ({"resume_weights_only": True}, "--resume_weights_only needs --resume_from_checkpoint"),
    ],
)
def test_contradictory_flags_are_refused(forged, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(flags(forged, overwrite_output_dir=True, **extra))


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_that_train_nothing_are_refused(tmp_path, steps):
    with pytest.raises(ValueError, match=f"--max_steps must be a positive .*; got {steps}$"):
        train.main(flags(tmp_path / "out", max_steps=steps))


def test_a_weights_only_run_needs_its_own_dir(forged):
    argv = flags(forged, resume_from_checkpoint="latest", resume_weights_only=True)
    with pytest.raises(ValueError, match="starts a new run at step 0.*choose a new --output_dir"):
        train.main(argv)


HOLD_LOCK = (
    "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
    "print(os.getpid(), flush=True); time.sleep(120)"
)  # what a running run holds: a POSIX record lock of its own process


@contextlib.contextmanager
def lock_held_by_another_process(out: Path):
    """Yields the pid of a live process that holds `out`'s run lock, until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert int(holder.stdout.readline()) == holder.pid
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_concurrent_run_into_the_same_dir_stops_at_once_naming_the_holder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    tmp_path.joinpath(LOCK_FILE).write_text(dead.stdout.strip())  # a killed run's pid, stale
    refusal = pytest.raises(ValueError, match="another training run")
    with lock_held_by_another_process(tmp_path) as pid, refusal as refused:
        train.main(flags(tmp_path))
    assert f"--output_dir {tmp_path}: another training run (pid {pid})" in str(refused.value)
    with pytest.raises(FileNotFoundError, match="--language_model"):  # released: the run starts
        train.main(flags(tmp_path))


FORK_AND_DIE = """
import os, sys, time
from pathlib import Path
from runtime.run_dir import _exclusive_lock
with _exclusive_lock(Path(sys.argv[1])):
    if os.fork() == 0:  # a loader worker: outlives a kill -9 of the run by seconds
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_a_killed_runs_forked_workers_do_not_hold_its_lock(tmp_path):
    run = subprocess.Popen([sys.executable, "-c", FORK_AND_DIE, str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert run.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"another training run \\(pid {run.pid}\\)"):
            train.main(flags(tmp_path))  # alive: refused
        run.kill()  # SIGKILL the run; its forked child lives on
        run.wait()
        with pytest.raises(FileNotFoundError, match="--language_model"):  # at once: not refused
            train.main(flags(tmp_path))
    finally:
        os.killpg(run.pid, signal.SIGKILL)


# --- resuming: exact or refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]
)
def test_a_checkpoint_missing_a_state_file_is_refused(forged, name):
    (forged / "checkpoint-2" / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing.*--resume_weights_only"):
        train.main(flags(forged, resume_from_checkpoint="latest"))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load would accept it
    path.write_bytes(bytes(data))


def scribble(path: Path) -> None:
    path.write_text("{ not: [valid")


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("optimizer.pt", truncate),
        ("optimizer.pt", flip_a_byte),
        ("scheduler.pt", truncate),
        ("rng_state.pth", truncate),
        ("trainer_state.json", scribble),
        ("train_config.yaml", scribble),
        ("projector.safetensors", truncate),
        ("adapter/adapter_model.safetensors", truncate),
    ],
)
def test_a_damaged_checkpoint_file_is_named(forged, name, damage):
    damage(forged / "checkpoint-2" / name)
    with pytest.raises(CheckpointError, match=f"{name}: damaged"):
        train.main(flags(forged, resume_from_checkpoint="latest"))


def test_loading_a_state_that_does_not_fit_names_the_file(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)) for _ in range(2)])
    torch.save(other.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: does not fit this run"):
        load_torch_state(optimizer, tmp_path / "optimizer.pt")
    truncate(tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: damaged or truncated"):
        load_torch_state(optimizer, tmp_path / "optimizer.pt")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"train_mode": "projector"}, "--train_mode is 'projector' here, 'projector+lora' there"),
        ({"lora_rank": 8}, "--lora_rank is 8 here, 4 there"),
        ({"target_modules": "c_attn"}, "--target_modules is 'c_attn' here, 'c_attn|w1|w2' there"),
        ({"projector_type": "resampler"}, "--projector_type is 'resampler' here, 'mlp2x_gelu'"),
        ({"learning_rate": 0.1}, "--learning_rate is 0.1 here, 0.0002 there"),
    ],
)
def test_a_changed_setting_on_resume_is_named(forged, change, said):
    with pytest.raises(ValueError, match=re.escape(said)) as refused:
        train.main(flags(forged, resume_from_checkpoint="latest", **change))
    # a new schedule may start from the weights; another network may not
    assert ("--resume_weights_only" in str(refused.value)) == ("learning_rate" in change)


def test_weights_only_checks_the_network_settings_not_the_schedule(forged, tmp_path):
    checkpoint = forged / "checkpoint-2"
    (checkpoint / "optimizer.pt").unlink()
    new_schedule = train.parse_args(
        flags(
            tmp_path / "new",
            learning_rate=0.1,
            resume_weights_only=True,
            resume_from_checkpoint=checkpoint,
        )
    )
    check_resume(new_schedule, checkpoint)
    new_rank = train.parse_args(flags(tmp_path / "new", lora_rank=8, resume_weights_only=True))
    with pytest.raises(ValueError, match="--lora_rank is 8 here"):
        check_resume(new_rank, checkpoint)


# --- flags refused at start ---------------------------------------------------------------------


@pytest.mark.parametrize("token", CONTROL_TOKENS)
def test_a_control_token_as_image_token_is_refused(tmp_path, token):
    with pytest.raises(ValueError, match=r"--image_token .* chat control token"):
        train.main(flags(tmp_path / "out", image_token=token))
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("prompt", ["Look at <image> first.", "Be brief.<|im_end|>"])
def test_a_system_prompt_with_markers_is_refused(tmp_path, prompt):
    with pytest.raises(ValueError, match="--system_prompt must not contain"):
        train.main(flags(tmp_path / "out", system_prompt=prompt))


# --- through train.py: exit status 2 and one line -----------------------------------------------


def run_train_py(*args, cwd: Path = REPO) -> str:
    """Runs train.py, expects exit status 2 and no traceback; returns the error line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "train.py"), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR train: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# train.py turns a ValueError or FileNotFoundError into one ERROR line and exit status 2; one
# run of the command for each, the other refusals in-process (a command costs ~6 s of imports).


@pytest.mark.slow
def test_a_run_into_a_locked_dir_exits_2_naming_it(tmp_path):
    with lock_held_by_another_process(tmp_path) as pid:
        line = run_train_py(*flags(tmp_path))
    assert f"--output_dir {tmp_path}: another training run (pid {pid})" in line


@pytest.mark.slow
def test_a_missing_language_model_exits_2_naming_the_flag(tmp_path):
    line = run_train_py(*flags(tmp_path, language_model=tmp_path / "no-llm"))
    assert f"--language_model {tmp_path / 'no-llm'}" in line


def test_a_missing_vision_tower_is_refused_naming_the_flag(tmp_path, tiny_qwen_dir):
    argv = flags(tmp_path, language_model=tiny_qwen_dir, vision_model=tmp_path / "no-tower")
    missing = re.escape(str(tmp_path / "no-tower"))
    with pytest.raises(FileNotFoundError, match=f"--vision_model.*{missing}"):
        train.main(argv)


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ("training:\n  output_dir: [unclosed\n", "not valid YAML"),
        ("training: 5\n", "section 'training' must be a mapping of keys, got 5"),
        ('data:\n  skip_invalid: "false"\n', "[data]: skip_invalid must be bool, got 'false'"),
        ('lora:\n  lora_rank: "8"\n', "[lora]: lora_rank must be int, got '8'"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_key(tmp_path, yaml_text, said):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    with pytest.raises(ValueError) as refused:
        train.main(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    assert said in str(refused.value) and str(recipe) in str(refused.value)
