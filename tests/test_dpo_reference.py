"""The DPO reference is the starting model entirely: an AnyRes reference packs its rows with the
starting `image_newline`, not the trained one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dataset.preference import PreferenceCollator
from dataset.processor import VLMProcessor
from model.config import LoraSettings
from model.trainable import configure_trainable
from runtime.preference import PreferenceObjective
from tests.test_anyres_wiring import _anyres_vlm


@pytest.fixture(scope="module")
def anyres_lora(tiny_qwen_dir, tiny_clip_dir, tokenizer):
    """A LoRA-wrapped tiny AnyRes VLM and a batch of two pairs, images of different shapes."""
    vlm, _ = _anyres_vlm(tiny_qwen_dir, tiny_clip_dir)
    configure_trainable(vlm, LoraSettings(lora_rank=4, lora_dropout=0.0))
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    pairs = []
    for index, size in enumerate([(70, 20), (30, 60)]):  # (width, height): 2x1 and 1x2 tiles
        inputs = processor.image_inputs([Image.new("RGB", size, (index * 90, 40, 200))])
        prompt = processor.prompt_ids(["user"], ["<image>\nwhat is it?"], inputs["image_sizes"])
        answers = [tokenizer.encode(text) + [tokenizer.im_end_id] for text in ("a box", "no")]
        pairs.append({
            "prompt_ids": torch.tensor(prompt),
            "chosen_ids": torch.tensor(answers[0]),
            "rejected_ids": torch.tensor(answers[1]),
            **inputs,
        })  # fmt: skip
    return vlm.train(), PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(pairs)


def test_the_anyres_reference_packs_with_the_starting_image_newline(anyres_lora):
    vlm, batch = anyres_lora
    objective = PreferenceObjective(vlm, beta=0.5, loss_type="sigmoid", rpo_alpha=None)
    start = objective.reference_log_probs(vlm, vlm, batch)
    newline = vlm.projector.image_newline.detach().clone()
    try:
        with torch.no_grad():  # training moved the policy's newline since the objective was built
            vlm.projector.image_newline.add_(1.0)
        _, metrics = objective(vlm, vlm, batch)
        with torch.no_grad():
            policy = vlm(**batch_rows(batch), answer_log_probs=True).log_probs
    finally:
        with torch.no_grad():
            vlm.projector.image_newline.copy_(newline)
    assert not torch.allclose(policy, start)  # the policy does see its new newline
    torch.testing.assert_close(objective.reference_log_probs(vlm, vlm, batch), start)
    chosen, rejected = policy.chunk(2)
    start_chosen, start_rejected = start.chunk(2)
    torch.testing.assert_close(metrics["rewards/chosen"], 0.5 * (chosen - start_chosen))
    torch.testing.assert_close(metrics["rewards/rejected"], 0.5 * (rejected - start_rejected))


def batch_rows(batch: dict) -> dict:
    """A pair batch as the plain forward takes it: every row with its own copy of its images."""
    return {
        **{key: batch[key] for key in ("input_ids", "attention_mask", "labels")},
        "pixel_values": torch.cat([batch["pixel_values"]] * 2),
        "image_sizes": torch.cat([batch["image_sizes"]] * 2),
    }
