"""The DPO reference is the starting model entirely: an AnyRes reference packs its rows with the
starting `image_newline`, not the trained one. `--precompute_ref_log_probs`: the values computed
once (sharded over processes) are those of the step's own reference forward, which it skips."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dataset.preference import PreferenceCollator
from dataset.processor import VLMProcessor
from model.config import LoraSettings
from model.trainable import configure_trainable
from runtime.preference import PreferenceObjective, precompute_reference
from tests.test_anyres_wiring import _anyres_vlm


@pytest.fixture(scope="module")
def anyres_lora(tiny_qwen_dir, tiny_clip_dir, tokenizer):
    """A LoRA-wrapped tiny AnyRes VLM, three pairs with images of different shapes, and the
    batch of the first two."""
    vlm, _ = _anyres_vlm(tiny_qwen_dir, tiny_clip_dir)
    configure_trainable(vlm, LoraSettings(lora_rank=4, lora_dropout=0.0))
    processor = VLMProcessor(tokenizer, vlm.image_token_id, vlm.image_processor)
    pairs = []
    for index, size in enumerate([(70, 20), (30, 60), (40, 40)]):  # (width, height): 2x1, 1x2
        inputs = processor.image_inputs([Image.new("RGB", size, (index * 90, 40, 200))])
        prompt = processor.prompt_ids(["user"], ["<image>\nwhat is it?"], inputs["image_sizes"])
        answers = [tokenizer.encode(text) + [tokenizer.im_end_id] for text in ("a box", "no")]
        pairs.append({
            "prompt_ids": torch.tensor(prompt),
            "chosen_ids": torch.tensor(answers[0]),
            "rejected_ids": torch.tensor(answers[1]),
            **inputs,
        })  # fmt: skip
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    return vlm.train(), collator(pairs[:2]), pairs, collator


def test_the_anyres_reference_packs_with_the_starting_image_newline(anyres_lora):
    vlm, batch, _, _ = anyres_lora
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


def test_precomputed_log_probs_are_the_reference_forwards_and_replace_it(anyres_lora, monkeypatch):
    vlm, _, pairs, collator = anyres_lora
    objective = PreferenceObjective(vlm, beta=0.5, loss_type="ipo", rpo_alpha=0.2)
    cached = precompute_reference(objective, vlm, pairs, collator, batch_size=2, device="cpu")
    assert cached.shape == (3, 2) and vlm.training  # its train mode is given back
    for index, pair in enumerate(pairs):  # one pair at a time: no padding, no neighbours
        alone = objective.reference_log_probs(vlm, vlm, collator([pair]))
        torch.testing.assert_close(cached[index], alone, rtol=0, atol=1e-5)

    # Two processes, run one after the other: rank 1 computes its shard (pairs 1 and 2, the
    # last repeated), then rank 0 (pairs 0 and 2) gathers both, rank after rank
    shards = []

    def gather(tensor):
        shards.append(tensor)
        return torch.cat([shards[-1], shards[0]])

    precompute_reference(
        objective, vlm, pairs, collator, batch_size=1, device="cpu", shard=(1, 2), gather=gather
    )
    gathered = precompute_reference(
        objective, vlm, pairs, collator, batch_size=1, device="cpu", shard=(0, 2), gather=gather
    )
    assert [shard.shape for shard in shards] == [(2, 2), (2, 2)]
    torch.testing.assert_close(gathered, cached, rtol=0, atol=1e-5)

    calls = []
    forward = PreferenceObjective._reference
    monkeypatch.setattr(
        PreferenceObjective, "_reference", lambda *a: calls.append(1) or forward(*a)
    )
    batch = collator(pairs[:2])
    torch.manual_seed(0)
    want = objective(vlm, vlm, batch)
    assert len(calls) == 1
    dataset_view = [{**pair, "reference_log_probs": cached[i]} for i, pair in enumerate(pairs)]
    batch = collator(dataset_view[:2])
    assert batch["reference_log_probs"].tolist() == cached[:2].T.flatten().tolist()
    torch.manual_seed(0)
    got = objective(vlm, vlm, batch)
    assert len(calls) == 1  # the reference forward did not run again
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    for name, values in want[1].items():
        torch.testing.assert_close(got[1][name], values, rtol=0, atol=1e-6, msg=name)


def test_the_flag_is_refused_where_it_cannot_work():
    import train

    with pytest.raises(ValueError, match="--precompute_ref_log_probs applies to .* dpo only"):
        train.parse_args(["--precompute_ref_log_probs"])
    flags = ["--training_objective", "dpo", "--precompute_ref_log_probs"]
    with pytest.raises(ValueError, match="cannot be used with --deepspeed or --fsdp"):
        train.parse_args([*flags, "--fsdp", "configs/fsdp/full_shard.json"])
    assert train.parse_args(flags).training.precompute_ref_log_probs
