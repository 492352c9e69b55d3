"""Scale-out engines (runtime/engines.py): flags refused at start, and real 2-process runs on CPU.

DeepSpeed ZeRO-2/3 run through the Trainer (DeepSpeed's CPU accelerator, gloo). FSDP2 runs through
torch's `fully_shard` with this toolkit's FSDP parts (tests/fsdp_worker.py): accelerate turns FSDP
on only for GPU processes. Every 2-process run trains on [image, text, text, text] with one sample
per rank and two per global step, so every step one rank has an image and the other none: the
runs finishing at all is the no-hang check (each has a timeout), and they must match one process
with the same global batch. Each answer is one token, so a mean of per-rank means is the global
mean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_training_runs import final_weights, flags, losses_of, write_mixed_data

import train
from model.checkpoint import LLM_DIR
from runtime import engines
from runtime.config import load_config
from runtime.merge import merge_checkpoint

REPO = Path(__file__).resolve().parent.parent
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
ZERO3 = REPO / "configs" / "deepspeed" / "zero3.json"
FSDP = REPO / "configs" / "fsdp" / "full_shard.json"
TIMEOUT = 300  # seconds; a hang fails the test instead of the whole CI run
needs_deepspeed = pytest.mark.skipif(
    not engines.deepspeed_installed(),
    reason="SKIPPED: deepspeed is not installed (pip install -r requirements-scale.txt)",
)


def write_json(path: Path, settings: dict) -> str:
    path.write_text(json.dumps(settings), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deepspeed": str(ZERO2), "fsdp": str(FSDP)}, "--deepspeed and --fsdp: choose one"),
        ({"fsdp": "configs/fsdp/nothing.json"}, "--fsdp 'configs/fsdp/nothing.json': no such"),
        ({"deepspeed": str(ZERO3), "bits": 4}, "ZeRO-3 cannot partition QLoRA"),
        ({"fsdp": str(FSDP), "bits": 4}, "FSDP cannot shard QLoRA"),
    ],
)
def test_engine_flags_the_run_cannot_honour_are_refused(overrides, message, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_engine_files_that_the_run_cannot_honour_name_the_flag_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}', encoding="utf-8")
    cases = [
        ({"deepspeed": str(broken)}, r"--deepspeed .*broken.json: not valid JSON \(line 1, column"),
        (
            {"deepspeed": write_json(tmp_path / "o.json", {"optimizer": {"type": "Adam"}})},
            "remove the 'optimizer' section",
        ),
        (
            {"deepspeed": write_json(tmp_path / "s.json", {"zero_optimization": {"stage": 4}})},
            "zero_optimization.stage must be 0-3",
        ),
        (
            {
                "deepspeed": write_json(
                    tmp_path / "nvme.json",
                    {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
                )
            },
            "offload_param.device 'nvme' is not supported",
        ),
        ({"fsdp": write_json(tmp_path / "v1.json", {"version": 1})}, "version 1 is not supported"),
        (
            {"fsdp": write_json(tmp_path / "sh.json", {"state_dict_type": "SHARDED_STATE_DICT"})},
            "state_dict_type 'SHARDED_STATE_DICT' is not supported",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            load_config(None, overrides)
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    with pytest.raises(ValueError, match="deepspeed package is not installed; pip install -r"):
        load_config(None, {"deepspeed": str(ZERO2)})


def test_engine_settings_take_their_sizes_and_wrap_unit_from_the_llm():
    llm = torch.nn.Module()
    llm.config = type("Config", (), {"hidden_size": 64})()
    llm._no_split_modules = ["QWenBlock"]
    zero3 = engines.deepspeed_settings(str(ZERO3), llm)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 64 * 64
    assert zero3["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero3["stage3_param_persistence_threshold"] == 640
    fsdp = engines.fsdp_settings(str(FSDP), llm)
    assert fsdp["transformer_layer_cls_to_wrap"] == ["QWenBlock"] and fsdp["version"] == 2
    assert engines.needs_tower_probe(str(ZERO3), None)
    assert not engines.needs_tower_probe(str(ZERO3), "features/")  # the tower never runs
    assert not engines.needs_tower_probe(str(ZERO2), None)


def test_fsdp_is_refused_on_cpu_not_run_as_ddp(engine_flags, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP can run")
    with pytest.raises(ValueError, match="--fsdp .*FSDP needs GPUs"):
        train.main(engine_flags(tmp_path / "out", fsdp=FSDP))
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_image_data(shapes_dir, tmp_path_factory) -> Path:
    """[image, text, text, text]: every step of a 2-process run has a rank without an image."""
    mixed = tmp_path_factory.mktemp("data") / "mixed.json"
    write_mixed_data(shapes_dir, mixed)
    records = json.loads(mixed.read_text())
    image, texts = records[0], [r for r in records if "image" not in r]
    extra = {"id": "txt2", "conversations": [
        {"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "yes"}]}  # fmt: skip
    path = mixed.with_name("one_image.json")
    path.write_text(json.dumps([image, *texts, extra]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def engine_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir, one_image_data):
    def make(out, **extra):
        settings = dict(max_steps=3, learning_rate=1e-2, feature_proj_lr=1e-2, save_steps=3)
        settings.update(extra)
        return flags(tiny_qwen_dir, tiny_clip_dir, one_image_data, shapes_dir, out, **settings)

    return make


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_two_processes(script: str, args: list[str], command: list[str] = TORCHRUN) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(REPO / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_weights(expected: Path, got: Path) -> None:
    want, have = final_weights(expected), final_weights(got)
    assert want.keys() == have.keys() and want
    # fp32 sums in another order: round-off, which Adam magnifies where a gradient is near 0 (its
    # step is lr * m / sqrt(v), about lr whatever the gradient's size); lr is 1e-2 here. So: no
    # element off by more than 1% of one step, and on average no more than round-off.
    for name in want:
        difference = (have[name] - want[name]).abs()
        assert difference.max() < 1e-4 and difference.mean() < 1e-6, (name, difference.max())


@pytest.fixture(scope="module")
def single_runs(engine_flags, tmp_path_factory):
    """1 process, batch 2 (the 2-process runs' global batch), per train_mode."""
    runs = {}
    for mode in ("projector+lora", "projector"):
        out = tmp_path_factory.mktemp("single")
        train.main(engine_flags(out, per_device_train_batch_size=2, train_mode=mode))
        runs[mode] = out
    return runs


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (ZERO2, "projector+lora"),
        (ZERO3, "projector+lora"),
        (ZERO3, "projector"),
        (ZERO3.with_name("zero3_offload.json"), "projector+lora"),
    ],
    ids=["zero2-lora", "zero3-lora", "zero3-projector", "zero3-offload-lora"],
)
def test_deepspeed_two_processes_match_one(config, mode, engine_flags, single_runs, tmp_path):
    out = tmp_path / "deepspeed"
    run_two_processes(
        "train.py",
        engine_flags(out, per_device_train_batch_size=1, train_mode=mode, deepspeed=config),
    )
    expected, got = losses_of(single_runs[mode], 3), losses_of(out, 3)
    assert len(set(expected)) > 1  # not a constant: the weights or the batches changed
    assert got == pytest.approx(expected, rel=1e-5)
    assert_same_weights(single_runs[mode], out)
    step = out / "checkpoint-3" / "global_step3"
    assert (out / "checkpoint-3" / "rng_state_1.pth").is_file() and step.is_dir()  # two ranks
    # the engine's files hold no frozen weight: a few times the trainable ones at most
    engine_bytes = sum(p.stat().st_size for p in step.iterdir())
    trainable_bytes = sum(t.numel() * 4 for t in final_weights(out).values())
    assert engine_bytes < 20 * trainable_bytes + 200_000, (engine_bytes, trainable_bytes)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("config", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_deepspeed_resumes_exactly_and_its_checkpoint_merges(config, engine_flags, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = dict(per_device_train_batch_size=1, deepspeed=config, max_steps=4, save_steps=2)
    run_two_processes("train.py", engine_flags(whole, **settings))
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    for name in ("projector.safetensors", "adapter", "loss.png"):  # as a kill after step 2 leaves
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_two_processes(
        "train.py", engine_flags(resumed, resume_from_checkpoint="latest", **settings)
    )
    assert losses_of(resumed, 4) == losses_of(whole, 4)
    assert_same_weights(whole, resumed)
    with pytest.raises(ValueError, match="--deepspeed is None here"):  # same engine, or refused
        without = {k: v for k, v in settings.items() if k != "deepspeed"}
        train.main(engine_flags(resumed, resume_from_checkpoint="latest", **without))
    assert_merges(whole / "checkpoint-4", tmp_path / "merged")


def assert_merges(checkpoint: Path, out: Path) -> None:
    """`merge` takes an engine's checkpoint like any other: its weights are whole."""
    merged = merge_checkpoint(checkpoint, out, dtype="float32")
    assert (merged / LLM_DIR / "config.json").is_file()
    for name, tensor in load_file(checkpoint / "projector.safetensors").items():
        assert torch.equal(load_file(merged / "projector.safetensors")[name], tensor)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_before_sharding(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, one_image_data, tmp_path
):
    common = [
        "--qwen", str(tiny_qwen_dir), "--clip", str(tiny_clip_dir), "--data", str(one_image_data),
        "--images", str(shapes_dir), "--fsdp", str(FSDP), "--steps", "2",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    worker = [sys.executable, str(REPO / "tests" / "fsdp_worker.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([*worker, *common, "--out", str(one)], check=True, env=env, timeout=TIMEOUT)
    run_two_processes("tests/fsdp_worker.py", [*common, "--out", str(two)])
    expected = json.loads((one / "losses.json").read_text())
    assert expected[0] != pytest.approx(expected[-1], rel=1e-3)
    assert json.loads((two / "losses.json").read_text()) == pytest.approx(expected, rel=1e-5)
    assert_same_weights(one, two)
    # resume: the 2-process checkpoint loaded before sharding, 2 more steps, as 1 process does
    again = ["--resume", str(two)]
    subprocess.run(
        [*worker, *common, *again, "--out", str(tmp_path / "one_b")], check=True, env=env,
        timeout=TIMEOUT,
    )  # fmt: skip
    run_two_processes("tests/fsdp_worker.py", [*common, *again, "--out", str(tmp_path / "two_b")])
    assert_same_weights(tmp_path / "one_b", tmp_path / "two_b")
    assert not torch.equal(  # the resumed runs started from the checkpoint and moved on
        final_weights(two)["linear_1.weight"],
        final_weights(tmp_path / "two_b")["linear_1.weight"],
    )
    assert_merges(two, tmp_path / "merged")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("launcher", ["torchrun-rendezvous", "accelerate-multi-node-config"])
def test_multi_node_launch_commands_run_on_one_node(launcher, engine_flags, single_runs, tmp_path):
    """The documented multi-node forms (docs/RECIPES.md), with one node of 2 processes."""
    port = free_port()
    if launcher == "torchrun-rendezvous":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"),
            "--num_machines=1", "--num_processes=2", "--machine_rank=0",
            "--main_process_ip=127.0.0.1", f"--main_process_port={port}",
        ]  # fmt: skip
    out = tmp_path / "run"
    run_two_processes(
        "train.py", engine_flags(out, per_device_train_batch_size=1, deepspeed=ZERO2), command
    )
    single = single_runs["projector+lora"]
    assert losses_of(out, 3) == pytest.approx(losses_of(single, 3))
    assert (out / "checkpoint-3" / "rng_state_1.pth").is_file()
