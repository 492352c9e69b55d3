"""Whole training runs on the tiny fixtures: stage 1 -> stage 2, QLoRA, exact resume after a
kill, weights-only resume, starting over in a used directory, 2-process DDP, and what a run reports
(tokens/s, loss curve). All slow: each trains."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_flags
from safetensors.torch import load_file

import train
from demo.tiny_models import save_tiny_qwen
from model.checkpoint import CheckpointError, describe, load_vlm, save_trainable
from runtime.data import build_datasets
from runtime.merge import merge_checkpoint
from runtime.resume import load_trainable_state, resolve_resume

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def flags(tiny_qwen_dir, tiny_clip_dir, data_path, image_folder, out, **extra) -> list[str]:
    settings = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                "per_device_train_batch_size": 2, "seed": 7, **extra}  # fmt: skip
    return train_flags(tiny_qwen_dir, tiny_clip_dir, data_path, image_folder, out, **settings)


@pytest.fixture
def run_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir):
    def make(out, **extra):
        return flags(
            tiny_qwen_dir, tiny_clip_dir, shapes_dir / "train.json", shapes_dir, out, **extra
        )

    return make


def trained_names(trainer) -> set[str]:
    return {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_stage1_projector_starts_stage2(run_flags, shapes_dir, tmp_path):
    stage1_out = tmp_path / "stage1"
    eval_split = {"eval_data_path": shapes_dir / "test.json", "save_steps": 2}  # eval at saves
    stage1 = train.main(run_flags(stage1_out, train_mode="projector", max_steps=2, **eval_split))
    assert [e["step"] for e in stage1.state.log_history if "eval_loss" in e] == [2]
    names = trained_names(stage1)
    assert names and all(n.startswith("projector.") for n in names)
    saved = load_file(stage1_out / "projector.safetensors")
    assert json.loads((stage1_out / "vlm_config.json").read_text())["weights"] == [
        "projector.safetensors"
    ]
    assert (stage1_out / "loss.png").stat().st_size > 1000  # the loss curve was drawn
    losses = [e for e in stage1.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(e["tokens_per_second"] > 0 for e in losses)
    assert all(0 <= e["data_wait_fraction"] <= 1 for e in losses)
    assert losses[-1]["num_input_tokens_seen"] > 2 * 2 * 10  # non-pad tokens of 2 batches of 2

    stage2_flags = run_flags(tmp_path / "stage2", projector_path=stage1_out, max_steps=1)
    vlm, _ = train.build_model(train.parse_args(stage2_flags))
    for name, tensor in vlm.projector.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    fresh, _ = train.build_model(train.parse_args(run_flags(tmp_path / "fresh")))
    assert any(  # stage 1 really moved the projector away from its (seeded) initialisation
        not torch.equal(t, saved[n]) for n, t in fresh.projector.state_dict().items()
    )
    names = {n for n, p in vlm.named_parameters() if p.requires_grad}
    llm_names = {n for n in names if not n.startswith("projector.")}
    assert llm_names and all(n.startswith("llm.") and "lora_" in n for n in llm_names)
    assert names - llm_names == {f"projector.{n}" for n in saved}


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The projector's weights, and the adapter's where the run trained one."""
    weights = load_file(out / "projector.safetensors")
    adapter = out / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        weights.update(load_file(adapter))
    return weights


def test_resume_after_a_kill_matches_an_uninterrupted_run(run_flags, tmp_path):
    """With loader workers, as by default: after a kill -9 they live on for seconds, and the
    resume, started at once, must not take them for a run still writing (issue 31)."""
    steps = dict(max_steps=6, save_steps=2, learning_rate=5e-3, feature_proj_lr=5e-3)
    steps["dataloader_num_workers"] = 2
    reference = tmp_path / "reference"
    train.main(run_flags(reference, **steps))

    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO / "train.py"), *run_flags(killed, **steps)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-2").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint-2 after 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    for checkpoint in killed.glob("checkpoint-*"):  # whatever looks complete is complete
        assert all((checkpoint / name).is_file() for name in CHECKPOINT_FILES), checkpoint

    resumed = train.main(run_flags(killed, resume_from_checkpoint="latest", **steps))
    assert resumed.state.global_step == 6
    expected, got = final_weights(reference), final_weights(killed)
    assert expected.keys() == got.keys()
    start = load_file(killed / "checkpoint-2" / "projector.safetensors")
    assert any(not torch.equal(start[n], got[n]) for n in start)  # training went on after step 2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    reference_losses = json.loads((reference / "checkpoint-6" / "trainer_state.json").read_text())
    resumed_losses = json.loads((killed / "checkpoint-6" / "trainer_state.json").read_text())
    pick = lambda state: [e["loss"] for e in state["log_history"] if "loss" in e]  # noqa: E731
    assert pick(resumed_losses)[-2:] == pytest.approx(pick(reference_losses)[-2:], rel=1e-5)


def test_qlora_trains_on_cpu_and_merges_in_full_precision(run_flags, tmp_path):
    config = train.parse_args(run_flags(tmp_path / "qlora", bits=4))
    vlm, tokenizer = train.build_model(config)
    quantized = [n for n, m in vlm.llm.named_modules() if type(m).__name__ == "Linear4bit"]
    assert any(n.endswith("c_attn") for n in quantized)  # LoRA sits on 4-bit layers
    assert all(p.dtype == torch.float32 for p in vlm.parameters() if p.requires_grad)
    train_data, _, collator = build_datasets(config.data, vlm, tokenizer)
    batch = collator([train_data[i] for i in range(2)])
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=2e-2)
    vlm.train()
    losses = []
    for _ in range(5):
        loss = vlm(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5, losses

    vlm.eval()
    batch.pop("labels")
    with torch.no_grad():
        qlora_logits = vlm(**batch).logits
        with vlm.llm.disable_adapter():
            base_logits = vlm(**batch).logits
    description = describe(
        vlm, config.language_model, config.vision, config.projector, system_prompt="sys"
    )
    save_trainable(vlm, tokenizer, tmp_path / "ckpt", description)
    merged_dir = merge_checkpoint(tmp_path / "ckpt", tmp_path / "merged", dtype="float32")
    merged, _, _ = load_vlm(merged_dir, dtype="float32")
    unmerged, _, _ = load_vlm(tmp_path / "ckpt", dtype="float32")  # full-precision base + adapter
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        with unmerged.llm.disable_adapter():
            full_base_logits = unmerged(**batch).logits
    # The merged model is the fp32 base + the adapter; the QLoRA model is the NF4 base + the same
    # adapter. Their only difference is the base's 4-bit rounding, whose size on these inputs is
    # |fp32 base - NF4 base| (adapter off). Allow 1.5x that (the adapter sees slightly different
    # activations), and require the merge to carry the adapter: its effect is much larger.
    quantization_error = (full_base_logits - base_logits).abs().max().item()
    lora_effect = (qlora_logits - base_logits).abs().max().item()
    error = (merged_logits - qlora_logits).abs().max().item()
    assert 0 < quantization_error < 0.25 * lora_effect  # the test can tell the two apart
    assert error <= 1.5 * quantization_error, (error, quantization_error)


def write_mixed_data(shapes_dir: Path, path: Path) -> None:
    """2 image + 2 text-only records, each answer one token + <|im_end|>, so every sample carries
    the same number of supervised tokens and a mean of per-rank means is the global mean."""
    # relative to the image folder, the only place training reads images from
    image = [p.relative_to(shapes_dir) for p in sorted((shapes_dir / "images").glob("*.png"))[:2]]
    records = [
        {"id": "img0", "image": str(image[0]), "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "red"}]},
        {"id": "txt0", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "blue"}]},
        {"id": "img1", "image": str(image[1]), "conversations": [
            {"from": "human", "value": "<image>\nIs there a shape?"},
            {"from": "gpt", "value": "yes"}]},
        {"id": "txt1", "conversations": [
            {"from": "human", "value": "Is grass green?"}, {"from": "gpt", "value": "yes"}]},
    ]  # fmt: skip
    path.write_text(json.dumps(records), encoding="utf-8")


def losses_of(out: Path, steps: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_two_processes_match_one_with_the_same_global_batch(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    data = tmp_path / "mixed.json"
    write_mixed_data(shapes_dir, data)

    def run_flags(out, batch):
        return flags(
            tiny_qwen_dir, tiny_clip_dir, data, shapes_dir, out,
            per_device_train_batch_size=batch, max_steps=3, learning_rate=1e-2,
            feature_proj_lr=1e-2, save_steps=3,
        )  # fmt: skip

    single = tmp_path / "single"
    train.main(run_flags(single, batch=4))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "train.py"), *run_flags(double, batch=2)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = losses_of(single, 3), losses_of(double, 3)
    assert len(got) == 3 and expected[0] != pytest.approx(expected[-1], rel=1e-3)  # it learned
    assert got == pytest.approx(expected, rel=1e-4)
    assert (double / "checkpoint-3" / "rng_state_1.pth").is_file()  # really two ranks


@pytest.fixture(scope="module")
def finished_run(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4; tests copy what they change."""
    out = tmp_path_factory.mktemp("finished")
    data = shapes_dir / "train.json"
    train.main(
        flags(tiny_qwen_dir, tiny_clip_dir, data, shapes_dir, out, max_steps=4, save_steps=2)
    )
    return out


def test_overwrite_output_dir_deletes_the_old_run_first(run_flags, finished_run, tmp_path, caplog):
    out = tmp_path / "reused"
    shutil.copytree(finished_run, out)
    with pytest.raises(ValueError, match="another run's outputs"):
        train.main(run_flags(out, max_steps=2, save_steps=2))
    with caplog.at_level(logging.WARNING, logger="runtime.run_dir"):
        train.main(run_flags(out, max_steps=2, save_steps=2, overwrite_output_dir=True))
    assert "deleted the previous run's" in caplog.text and "checkpoint-4" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    latest = resolve_resume(
        train.parse_args(run_flags(out, resume_from_checkpoint="latest")).training
    )
    assert json.loads((Path(latest) / "trainer_state.json").read_text())["max_steps"] == 2  # new


def test_resume_weights_only_loads_the_weights_and_starts_at_step_0(
    run_flags, finished_run, tmp_path, caplog
):
    checkpoint = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(finished_run / "checkpoint-2", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    resume = dict(resume_from_checkpoint=checkpoint, max_steps=1)
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        train.main(run_flags(tmp_path / "new", **resume))
    frozen = dict(learning_rate=0.0, feature_proj_lr=0.0)  # the final weights are the loaded ones
    with caplog.at_level(logging.WARNING, logger="runtime.trainer"):
        trainer = train.main(
            run_flags(tmp_path / "new", resume_weights_only=True, **resume, **frozen)
        )
    assert "NOT AN EXACT RESUME" in caplog.text
    assert trainer.state.global_step == 1  # counted from 0
    expected, got = final_weights(checkpoint), final_weights(tmp_path / "new")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_weights_that_do_not_fit_name_the_file_and_the_shapes(run_flags, finished_run, tmp_path):
    checkpoint = finished_run / "checkpoint-2"
    vlm, _ = train.build_model(train.parse_args(run_flags(tmp_path, lora_rank=8)))
    shapes = r"size mismatch .*torch.Size\(\[4, 64\]\).*torch.Size\(\[8, 64\]\)"
    with pytest.raises(CheckpointError, match=f"adapter_model.safetensors: does not fit.*{shapes}"):
        load_trainable_state(vlm, checkpoint)
    other_llm = save_tiny_qwen(tmp_path / "other-qwen", seed=1)
    vlm, _ = train.build_model(train.parse_args(run_flags(tmp_path, language_model=other_llm)))
    with pytest.raises(CheckpointError, match="trained on other language_model weights"):
        load_trainable_state(vlm, checkpoint)
