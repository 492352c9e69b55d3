"""Identity is content, not a path: a changed model, tower or data file at the same path is never
taken for the old one (`identity/fingerprint.py` decides, every user compares through it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint as save_checkpoint
from safetensors.torch import load_file, save_file
from test_evaluation import pope_files  # noqa: F401 - a fixture
from test_run_hardening import flags, forge_checkpoint

import train
from identity.fingerprint import fingerprints_differ, module_fingerprint, path_fingerprint
from model.base_check import _legacy_fingerprint
from model.checkpoint import FORMAT, CheckpointError, load_vlm
from runtime.evaluation import cli
from runtime.merge import merge_checkpoint
from runtime.resume import TRAINING_DATA, data_identity
from visual import load_vision_tower
from visual.feature_cache import FeatureCache, encode_feature_cache, tower_cache_settings


def changed_copy(model_dir: Path, out: Path, tensor: str) -> Path:
    """`model_dir` copied with one tensor moved by 0.01 (every other byte the same)."""
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights[tensor] = weights[tensor] + 0.01
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir) -> Path:
    """A LoRA checkpoint whose adapter moves the weights (B != 0, as after training)."""
    out = save_checkpoint(tmp_path_factory.mktemp("trained"), tiny_qwen_dir, tiny_clip_dir)
    adapter = out / "adapter" / "adapter_model.safetensors"
    state = load_file(adapter)
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in state if "lora_B" in n]:
        state[name] = torch.randn(state[name].shape, generator=generator) * 0.05
    save_file(state, adapter, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "tensor",
    ["transformer.h.1.mlp.w2.weight", "transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight",
     "lm_head.weight"],
)  # fmt: skip
def test_a_change_to_any_base_layer_is_refused(trained, tiny_qwen_dir, tmp_path, tensor):
    other = changed_copy(Path(tiny_qwen_dir), tmp_path / "other", tensor)
    with pytest.raises(CheckpointError, match="trained on other language_model weights"):
        load_vlm(trained, language_model=str(other), dtype="float32")


def test_the_merged_llm_as_base_is_refused_lora_would_apply_twice(trained, tmp_path):
    merged = merge_checkpoint(trained, tmp_path / "merged", dtype="float32")
    with pytest.raises(CheckpointError, match="merged model .*would apply twice") as refused:
        load_vlm(trained, language_model=str(merged / "language_model"), dtype="float32")
    assert "\n" not in str(refused.value)
    copied = shutil.copytree(merged / "language_model", tmp_path / "copied")  # no merge record
    with pytest.raises(CheckpointError, match="holds the LoRA already"):  # the fingerprint sees it
        load_vlm(trained, language_model=str(copied), dtype="float32")
    load_vlm(merged, dtype="float32")  # the merged model itself loads


def test_fp32_and_bf16_loads_of_the_same_weights_agree(trained):
    full = load_vlm(trained, dtype="float32")[0]
    half = load_vlm(trained, dtype="bfloat16")[0]
    assert not fingerprints_differ(module_fingerprint(full.vision), module_fingerprint(half.vision))


def test_an_old_checkpoints_first_parameter_fingerprint_is_still_checked(
    trained, tiny_qwen_dir, tmp_path
):
    old = Path(shutil.copytree(trained, tmp_path / "old"))
    vlm = load_vlm(trained, dtype="float32")[0]
    description = json.loads((old / "vlm_config.json").read_text())
    description["base_fingerprint"] = {
        "language_model": _legacy_fingerprint(vlm.llm.get_base_model()),
        "vision": _legacy_fingerprint(vlm.vision),
    }
    (old / "vlm_config.json").write_text(json.dumps(description))
    load_vlm(old, dtype="float32")  # the same bases: loads
    merged = merge_checkpoint(trained, tmp_path / "merged", dtype="float32")
    with pytest.raises(CheckpointError, match="would apply twice"):  # embedding unchanged
        load_vlm(old, language_model=str(merged / "language_model"), dtype="float32")
    other = changed_copy(Path(tiny_qwen_dir), tmp_path / "other", "transformer.wte.weight")
    with pytest.raises(CheckpointError, match="trained on other language_model weights"):
        load_vlm(old, language_model=str(other), dtype="float32")


def test_a_file_fingerprint_sees_an_edit_and_the_record_order(tmp_path):
    records = [{"id": str(i), "conversations": []} for i in range(3)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    before = path_fingerprint(data)
    data.write_text(json.dumps(records[::-1]))
    assert path_fingerprint(data) != before
    data.write_text(json.dumps(records))
    assert path_fingerprint(data) == before


def test_a_sampled_fingerprint_of_a_large_file_sees_a_rewrite(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(bytes(range(256)) * 100_000)  # 25.6 MB
    before = path_fingerprint(weights, sample_over=1 << 20)
    weights.write_bytes(bytes(reversed(range(256))) * 100_000)
    assert path_fingerprint(weights, sample_over=1 << 20) != before


def test_an_exact_resume_refuses_other_or_edited_data(tmp_path):
    records = [{"id": str(i), "conversations": []} for i in range(4)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = flags(out, data_path=data)
    checkpoint = forge_checkpoint(out / "checkpoint-2", argv)
    description = {"format": FORMAT, TRAINING_DATA: data_identity(train.parse_args(argv).data)}
    (checkpoint / "vlm_config.json").write_text(json.dumps(description))
    resume = flags(out, data_path=data, resume_from_checkpoint="latest")
    with pytest.raises(FileNotFoundError, match="--language_model"):  # the same data: resumes
        train.main(resume)
    data.write_text(json.dumps(records[::-1]))  # the same records in another order
    with pytest.raises(ValueError, match=f"--data_path {data}: not the data {checkpoint} trained"):
        train.main(resume)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records[:3]))
    with pytest.raises(ValueError, match=f"--data_path {other}: not the data"):
        train.main(flags(out, data_path=other, resume_from_checkpoint="latest"))
    weights_only = flags(tmp_path / "new", data_path=other, resume_from_checkpoint=checkpoint,
                         resume_weights_only=True)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--language_model"):  # a new run: any data
        train.main(weights_only)


class AnswersYes:
    """Stands in for an InferenceSession of the model at --model_weights."""

    def __init__(self, answer: str = "yes") -> None:
        self.answer = answer

    def answer_batch(self, conversations, images, system_prompts=None) -> list[str]:
        return [self.answer] * len(conversations)


def test_evaluation_refuses_to_mix_answers_of_a_retrained_model_or_edited_data(
    pope_files,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    coco, images = pope_files
    model = tmp_path / "model"
    model.mkdir()
    (model / "projector.safetensors").write_bytes(b"weights of the first training")
    args = ["--benchmark", "pope", "--data", str(coco), "--image_folder", str(images),
            "--model_weights", str(model), "--output_dir", str(tmp_path / "eval"),
            "--no_progress"]  # fmt: skip
    assert cli.evaluate(cli.parse_args(args), AnswersYes())["counts"]["answered"] == 7
    cli.evaluate(cli.parse_args(args), AnswersYes())  # the same model and data: resumes
    (model / "projector.safetensors").write_bytes(b"weights of the second training")
    with pytest.raises(ValueError, match="model_content: the model at --model_weights changed"):
        cli.evaluate(cli.parse_args(args), AnswersYes("no"))
    (model / "projector.safetensors").write_bytes(b"weights of the first training")
    pope = coco / "coco_pope_random.json"
    pope.write_text(pope.read_text().replace("a thing 1", "a dog"))
    with pytest.raises(ValueError, match="data_content: the --data files changed"):
        cli.evaluate(cli.parse_args(args), AnswersYes())
    report = cli.evaluate(cli.parse_args([*args, "--overwrite"]), AnswersYes("no"))
    assert report["counts"]["answered"] == 7  # all asked again: none of the old answers kept


def test_the_feature_cache_refuses_features_of_old_weights_at_the_same_path(
    tiny_clip_dir, shapes_dir, tmp_path
):
    tower_dir = Path(shutil.copytree(tiny_clip_dir, tmp_path / "tower"))
    tower = load_vision_tower(str(tower_dir))
    images = [r["image"] for r in json.loads((shapes_dir / "test.json").read_text())]
    cache = FeatureCache(encode_feature_cache(tower, images, shapes_dir, tmp_path / "cache"))
    cache.check_matches(tower_cache_settings(tower))  # the same weights: read
    weights = load_file(tower_dir / "model.safetensors")
    name = sorted(n for n in weights if "layers.0." in n and n.endswith("fc1.weight"))[0]
    weights[name] = weights[name] + 0.01  # new weights, same path, same settings
    save_file(weights, tower_dir / "model.safetensors", metadata={"format": "pt"})
    retrained = load_vision_tower(str(tower_dir))
    with pytest.raises(ValueError, match="another vision tower setup: weights: cache '"):
        cache.check_matches(tower_cache_settings(retrained))


def test_weights_are_written_with_the_umask_and_a_damaged_adapter_config_is_named(
    trained, tiny_qwen_dir, tiny_clip_dir, tmp_path
):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = save_checkpoint(tmp_path / "fresh", tiny_qwen_dir, tiny_clip_dir)
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        assert (fresh / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    merged = merge_checkpoint(trained, tmp_path / "merged", dtype="float32")
    for path in merged.rglob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    damaged = Path(shutil.copytree(trained, tmp_path / "damaged"))
    config = damaged / "adapter" / "adapter_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(CheckpointError, match=f"{config}: damaged") as refused:
        load_vlm(damaged, dtype="float32")
    assert "does not fit" not in str(refused.value)
