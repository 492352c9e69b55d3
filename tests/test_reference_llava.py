"""The reference LLaVA built from our weights computes our loss, with and without LoRA."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from bench.reference_llava import (
    apply_reference_lora,
    build_reference_llava,
    reference_lora_targets,
    reference_projector,
)
from demo.tiny_towers import save_tiny_siglip_tower
from model.builder import build_vlm
from model.config import LoraSettings
from model.trainable import configure_trainable
from model.vlm import VisionLanguageModel
from runtime.config import load_config

PAD_ID = 151643  # <|endoftext|>
LENGTHS = (40, 29)  # two samples of different lengths, right-padded
HEADER = 3  # text tokens before the image


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_siglip_tower(tmp_path_factory.mktemp("tiny-siglip"))


def tiny_vlm(tiny_qwen_dir, vision_dir) -> VisionLanguageModel:
    config = load_config(
        None,
        {"language_model": str(tiny_qwen_dir), "vision_model": str(vision_dir), "dtype": "float32"},
    )
    torch.manual_seed(0)
    vlm, _ = build_vlm(config.language_model, config.vision, config.projector)
    return vlm.train()


def make_batch(vlm: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Random text, one image per sample, labels only on each sample's last 8 tokens."""
    generator = torch.Generator().manual_seed(1)
    width, image_tokens = max(LENGTHS), vlm.num_image_tokens
    input_ids = torch.full((len(LENGTHS), width), PAD_ID)  # [B, T]
    labels = torch.full((len(LENGTHS), width), -100)  # [B, T]
    attention_mask = torch.zeros((len(LENGTHS), width), dtype=torch.long)  # [B, T]
    for row, length in enumerate(LENGTHS):
        input_ids[row, :length] = torch.randint(0, 151000, (length,), generator=generator)
        input_ids[row, HEADER : HEADER + image_tokens] = vlm.image_token_id
        labels[row, length - 8 : length] = input_ids[row, length - 8 : length]
        attention_mask[row, :length] = 1
    noise = torch.randint(0, 256, (48, 40, 3), generator=generator, dtype=torch.uint8)
    images = [Image.new("RGB", (50, 30), (200, 30, 30)), Image.fromarray(noise.numpy())]
    pixel_values = vlm.vision.preprocess(images)  # [2, 3, H, W]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "labels": labels,
    }


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_reference_loss_equals_ours(tiny_qwen_dir, tiny_clip_dir, siglip_dir, tower):
    vlm = tiny_vlm(tiny_qwen_dir, tiny_clip_dir if tower == "clip" else siglip_dir)
    reference = build_reference_llava(vlm)
    assert not reference.model.vision_tower.training and reference.training
    batch = make_batch(vlm)
    with torch.no_grad():
        ours = vlm(**batch).loss
        theirs = reference(**batch).loss
    assert ours.item() > 1.0
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_lora_keeps_the_loss_and_the_projector_gradient(tiny_qwen_dir, tiny_clip_dir):
    vlm = tiny_vlm(tiny_qwen_dir, tiny_clip_dir)
    reference = build_reference_llava(vlm)
    configure_trainable(vlm, LoraSettings(lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    targets = reference_lora_targets("c_attn|w1|w2", native=True)
    reference = apply_reference_lora(reference, rank=4, alpha=8, dropout=0.0, targets=targets)
    batch = make_batch(vlm)
    ours, theirs = vlm(**batch).loss, reference(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-5
    ours.backward()
    theirs.backward()
    our_grad = vlm.projector.linear_1.weight.grad
    their_grad = reference_projector(reference).linear_1.weight.grad
    assert our_grad.abs().max() > 0
    assert torch.allclose(our_grad, their_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        ("c_attn|w1|w2", {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}),
        (
            "c_attn|c_proj|w1|w2",
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
    ],
)
def test_reference_lora_sits_in_the_language_model_only(
    tiny_qwen_dir, tiny_clip_dir, ours, expected
):
    vlm = tiny_vlm(tiny_qwen_dir, tiny_clip_dir)
    targets = reference_lora_targets(ours, native=True)
    reference = apply_reference_lora(
        build_reference_llava(vlm), rank=4, alpha=8, dropout=0.0, targets=targets
    )
    adapted = [n for n, m in reference.named_modules() if hasattr(m, "lora_A") and "lora_" not in n]
    layers = vlm.llm.config.num_hidden_layers
    assert len(adapted) == layers * len(expected)
    assert all(".language_model.layers." in name for name in adapted)
    assert not any("vision_tower" in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == expected
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".multi_modal_projector." in n for n in trainable)
    assert any(".multi_modal_projector.linear_1." in n for n in trainable)


def test_unsupported_parts_are_named(tiny_qwen_dir, tiny_clip_dir):
    vlm = tiny_vlm(tiny_qwen_dir, tiny_clip_dir)
    other_llm = VisionLanguageModel(vlm.vision, vlm.projector, nn.Linear(2, 2), vlm.image_token_id)
    with pytest.raises(ValueError, match="QWenLMHeadModel.*got Linear"):
        build_reference_llava(other_llm)
    other_tower = VisionLanguageModel(nn.Identity(), vlm.projector, vlm.llm, vlm.image_token_id)
    with pytest.raises(ValueError, match="CLIP or SigLIP vision tower.*got Identity"):
        build_reference_llava(other_tower)
    configure_trainable(vlm, LoraSettings(lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    with pytest.raises(ValueError, match="before LoRA"):
        build_reference_llava(vlm)
