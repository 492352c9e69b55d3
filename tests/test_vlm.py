"""The composed VLM: what trains, optimizer groups, small checkpoints, merging, overfitting."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from model.builder import build_vlm
from model.checkpoint import describe, load_vlm, save_trainable
from model.trainable import configure_trainable, lora_target_regex
from runtime.config import load_config
from runtime.data import build_datasets
from runtime.merge import merge_checkpoint


def make_config(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path, **overrides):
    settings = {
        "language_model": str(tiny_qwen_dir),
        "dtype": "float32",
        "vision_model": str(tiny_clip_dir),
        "data_path": str(shapes_dir / "train.json"),
        "image_folder": str(shapes_dir),
        "model_max_length": 128,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "dataloader_num_workers": 0,
        **overrides,
    }
    return load_config(None, settings)


@pytest.fixture
def config(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path):
    return make_config(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path)


def build_trainable(config):
    vlm, tokenizer = build_vlm(config.language_model, config.vision, config.projector)
    configure_trainable(vlm, config.lora)
    return vlm, tokenizer


def first_batch(config, vlm, tokenizer, size=4):
    train, _, collator = build_datasets(config.data, vlm, tokenizer)
    return collator([train[i] for i in range(size)])


def test_lora_attaches_to_the_llm_only(config):
    vlm, _ = build_trainable(config)
    lora_modules = [n for n, m in vlm.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n]
    layers = vlm.llm.config.num_hidden_layers
    assert len(lora_modules) == layers * 3
    assert all(n.startswith("llm.") for n in lora_modules)
    assert {n.rsplit(".", 1)[-1] for n in lora_modules} == {"c_attn", "w1", "w2"}
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("llm."))


def test_target_regex_rejects_garbage():
    assert lora_target_regex("c_attn|w1") == r"(?:.*\.)?(?:c_attn|w1)"
    with pytest.raises(ValueError, match="--target_modules"):
        lora_target_regex("c_attn||*")


@pytest.mark.parametrize("mode", ["projector", "projector+llm"])
def test_train_modes(config, mode):
    config.lora.train_mode = mode
    vlm, _ = build_trainable(config)
    assert not isinstance(vlm.llm, PeftModel)
    llm_trainable = any(p.requires_grad for p in vlm.llm.parameters())
    assert llm_trainable == (mode == "projector+llm")
    assert all(not p.requires_grad for p in vlm.vision.parameters())


def test_vision_stays_frozen_and_in_eval(config):
    vlm, tokenizer = build_trainable(config)
    vlm.train()
    assert not vlm.vision.training
    batch = first_batch(config, vlm, tokenizer)
    vlm(**batch).loss.backward()
    assert all(p.grad is None for p in vlm.vision.parameters())
    assert all(p.grad is not None for p in vlm.projector.parameters())


def test_checkpoint_holds_only_trainable_and_reloads_identically(config, tmp_path):
    vlm, tokenizer = build_trainable(config)
    with torch.no_grad():  # make LoRA matter, so a lost adapter would show in the logits
        for name, param in vlm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    vlm.eval()
    batch = first_batch(config, vlm, tokenizer)
    batch.pop("labels")
    expected = vlm(**batch).logits
    description = describe(
        vlm, config.language_model, config.vision, config.projector, system_prompt="sys"
    )
    out = tmp_path / "ckpt"
    save_trainable(vlm, tokenizer, out, description)
    weight_bytes = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    trainable_bytes = sum(p.numel() * 4 for p in vlm.parameters() if p.requires_grad)
    assert weight_bytes < trainable_bytes * 1.1  # nothing frozen was copied
    assert json.loads((out / "vlm_config.json").read_text())["weights"] == [
        "projector.safetensors",
        "adapter",
    ]
    reloaded, _, _ = load_vlm(out, dtype="float32")
    torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)

    merged_dir = merge_checkpoint(out, tmp_path / "merged", dtype="float32")
    merged, _, _ = load_vlm(merged_dir, dtype="float32")
    assert not isinstance(merged.llm, PeftModel)
    assert (merged_dir / "language_model" / "model.safetensors").is_file()
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_overfits_a_fixed_batch(config):
    # A random tiny LLM's frozen ln_f + lm_head cap the logit margin (|h| * |w_row| ~ 1.3), so
    # only full training can drive the loss to zero; LoRA on it reaches the argmax, not loss 0.
    config.lora.train_mode = "projector+llm"
    torch.manual_seed(0)
    vlm, tokenizer = build_trainable(config)
    batch = first_batch(config, vlm, tokenizer)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    vlm.train()
    first = None
    for _ in range(80):
        loss = vlm(**batch).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5.0
    assert loss.item() < 0.05 * first  # from ~12 (uniform over 151,936) to near zero


def test_text_only_batch_still_touches_the_projector(config):
    vlm, tokenizer = build_trainable(config)
    vlm.train()
    ids = torch.tensor([tokenizer.encode("hello there")])
    out = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in vlm.projector.parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in vlm.projector.parameters())
    vlm.eval()  # no probe outside training: the same loss without the image path
    assert vlm(input_ids=ids, labels=ids).loss.item() == out.loss.item()


def test_text_only_batch_runs_the_tower_when_zero3_gathers_it(config):
    """Under ZeRO-3 the frozen tower gathers its weights when it runs: every rank must run it."""
    vlm, tokenizer = build_trainable(config)
    vlm.train()
    calls = []
    vlm.vision.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    ids = torch.tensor([tokenizer.encode("hello there")])
    vlm(input_ids=ids, labels=ids).loss.backward()
    assert calls == []  # by default only the projector runs
    vlm.probe_tower = True
    loss = vlm(input_ids=ids, labels=ids).loss
    size = vlm.vision.image_size
    assert calls == [(1, 3, size, size)] and torch.isfinite(loss)


def test_multi_image_and_text_only_samples_in_one_batch(config):
    from dataset.collator import SupervisedCollator
    from dataset.conversation import encode_conversation

    vlm, tokenizer = build_trainable(config)
    n = vlm.num_image_tokens
    turns = [
        (["user", "assistant"], ["<image>\nleft\n<image>\nright: same colour?", "yes"], 2),
        (["user", "assistant"], ["just text", "ok"], 0),
    ]
    samples = []
    for roles, contents, images in turns:
        encoded = encode_conversation(
            tokenizer, roles, contents, image_token_id=vlm.image_token_id, num_image_tokens=n
        )
        pixels = torch.rand(images, 3, 32, 32) if images else None
        samples.append({"input_ids": torch.tensor(encoded.input_ids),
                        "labels": torch.tensor(encoded.labels), "pixel_values": pixels})  # fmt: skip
    batch = SupervisedCollator(tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 2
    assert int((batch["input_ids"] == vlm.image_token_id).sum()) == 2 * n
    vlm.train()
    loss = vlm(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=str(2 * n)):  # one image too few for the placeholders
        vlm(**{**batch, "pixel_values": batch["pixel_values"][:1]})
