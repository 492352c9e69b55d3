"""Sequence packing and length grouping: bins, isolation inside the LLM, equal losses, training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

import train
from bench.batches import llava_like_lengths
from dataset.collator import SupervisedCollator
from dataset.conversation import IGNORE_INDEX
from dataset.packing import PackedCollator, pack_lengths, pack_samples, plan_packs
from qwen import QWenConfig, QWenLMHeadModel
from qwen.attention_qwen import build_attention_mask

PAD = 0  # the tiny test models have 1,000 ids; masks come from lengths, not from PAD


def random_sample(length: int, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    ids = torch.randint(0, 1000, (length,), generator=generator)
    labels = ids.clone()
    labels[: length // 2] = IGNORE_INDEX  # a prompt, then an answer
    return {"input_ids": ids, "labels": labels, "pixel_values": None}


def test_plan_packs_places_every_sample_once_within_capacity():
    lengths = [576 + text for text in llava_like_lengths(2000, seed=0)]
    packs = plan_packs(lengths, 2048)
    flat = sorted(i for pack in packs for i in pack)
    assert flat == list(range(len(lengths)))
    assert max(pack_lengths(lengths, packs)) <= 2048
    assert plan_packs(lengths, 2048) == packs  # deterministic
    with pytest.raises(ValueError, match="sample 1 has 30 tokens.*capacity 20"):
        plan_packs([5, 30], 20)


def test_grouping_and_packing_cut_padding_below_five_percent_on_a_llava_like_mix():
    from bench.padding import measure, parse_args

    results = measure(parse_args(["--samples", "4000"]))
    padding = {row["order"]: row["padding_fraction"] for row in results}
    assert padding["random batches"] > 0.3  # random batches of this mix waste a lot
    assert padding["--group_by_length"] <= 0.05
    assert padding["--packing --group_by_length"] <= 0.05
    slots = {row["order"]: row["padded_slots"] for row in results}
    assert slots["--packing --group_by_length"] < 0.6 * slots["random batches"]


def test_packed_collator_restarts_positions_and_isolates_tail_padding():
    generator = torch.Generator().manual_seed(0)
    rows = [
        pack_samples([random_sample(4, generator), random_sample(3, generator)]),
        pack_samples([random_sample(5, generator)]),
    ]
    batch = PackedCollator(SupervisedCollator(pad_token_id=PAD))(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 4] == IGNORE_INDEX
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all()
    segments = find_packed_sequence_indices(batch["position_ids"])
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]


def test_unpacked_positions_need_no_mask():
    positions = torch.arange(6)[None]
    assert find_packed_sequence_indices(positions) is None
    assert build_attention_mask(None, 6, 0, torch.device("cpu"), positions) is None


def tiny_qwen() -> QWenLMHeadModel:
    torch.manual_seed(0)
    config = QWenConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        kv_channels=8, intermediate_size=64, seq_length=64,
    )  # fmt: skip
    return QWenLMHeadModel(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=32, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_qwen, tiny_qwen2], ids=["qwen", "qwen2"])
def test_packed_logits_equal_each_sample_alone(build):
    model = build()
    generator = torch.Generator().manual_seed(1)
    samples = [random_sample(n, generator) for n in (7, 5, 9)]
    row = pack_samples(samples)
    with torch.no_grad():
        # No cache, as in training: transformers detects packed rows only without one.
        packed = model(
            input_ids=row["input_ids"][None],
            position_ids=row["position_ids"][None],
            use_cache=False,
        ).logits[0]  # [21, V]
        start = 0
        for sample in samples:
            alone = model(input_ids=sample["input_ids"][None]).logits[0]  # [n, V]
            end = start + len(sample["input_ids"])
            assert torch.allclose(packed[start:end], alone, atol=1e-5), f"segment at {start}"
            start = end


def test_packed_loss_and_gradients_equal_the_padded_batch():
    model = tiny_qwen().train()
    generator = torch.Generator().manual_seed(2)
    samples = [random_sample(n, generator) for n in (6, 11, 4, 8)]
    padded = SupervisedCollator(pad_token_id=PAD)(samples)
    packed = PackedCollator(SupervisedCollator(pad_token_id=PAD))(
        [pack_samples(samples[:2]), pack_samples(samples[2:])]
    )
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**{k: v for k, v in batch.items() if k != "pixel_values"}).loss
        loss.backward()
        results.append((loss.detach(), model.transformer.h[0].attn.c_attn.weight.grad.clone()))
    (loss_padded, grad_padded), (loss_packed, grad_packed) = results
    assert torch.allclose(loss_packed, loss_padded, atol=1e-6)
    assert torch.allclose(grad_packed, grad_padded, atol=1e-6)


@pytest.fixture
def packing_flags(tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path):
    def make(name: str, **extra) -> list[str]:
        settings = {
            "language_model": tiny_qwen_dir, "dtype": "float32", "vision_model": tiny_clip_dir,
            "data_path": shapes_dir / "train.json", "image_folder": shapes_dir,
            "model_max_length": 128, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "output_dir": tmp_path / name, "report_to": "none", "dataloader_num_workers": 0,
            "per_device_train_batch_size": 2, "logging_steps": 1, "seed": 3, "max_steps": 2,
            **extra,
        }  # fmt: skip
        switches = [f"--{key}" for key, value in settings.items() if value is True]
        values = {key: value for key, value in settings.items() if value is not True}
        return switches + [
            item for key, value in values.items() for item in (f"--{key}", str(value))
        ]

    return make


def test_packed_training_sees_the_same_first_loss_as_unpacked(packing_flags):
    """One step over all 48 samples, as 48 rows or as their bins: the losses agree."""
    plain = train.main(packing_flags("plain", per_device_train_batch_size=48, max_steps=1))
    # The ~45-token shapes samples pack 2 to a 128-token bin; one batch of <= 48 bins holds all.
    packed = train.main(
        packing_flags("packed", packing=True, per_device_train_batch_size=48, max_steps=1)
    )
    assert packed.state.num_input_tokens_seen == plain.state.num_input_tokens_seen
    assert len(packed.train_dataset) <= len(plain.train_dataset) / 2
    for key in ("loss", "grad_norm"):
        expected = plain.state.log_history[0][key]
        assert packed.state.log_history[0][key] == pytest.approx(expected, abs=1e-4), key


def test_group_by_length_uses_the_cached_lengths(packing_flags):
    trainer = train.main(packing_flags("grouped", group_by_length=True))
    sampler = trainer._get_train_sampler()
    assert type(sampler).__name__ == "LengthGroupedSampler"
    assert sampler.lengths == trainer.train_dataset.lengths
    assert np.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.slow
def test_packed_grouped_run_resumes_exactly(packing_flags, tmp_path):
    """Bins and the grouped order are reproducible, so resuming from a checkpoint continues the
    same run: the final weights equal the uninterrupted run's."""
    steps = {"packing": True, "group_by_length": True, "max_steps": 4, "save_steps": 2}
    steps.update(per_device_train_batch_size=4, learning_rate=5e-3, feature_proj_lr=5e-3)
    train.main(packing_flags("whole", **steps))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train.main(packing_flags("resumed", resume_from_checkpoint="latest", **steps))
    assert resumed.state.global_step == 4
    start = load_file(tmp_path / "whole" / "checkpoint-2" / "projector.safetensors")
    final = load_file(tmp_path / "resumed" / "projector.safetensors")
    assert any(not torch.equal(start[key], final[key]) for key in start)  # steps 3-4 trained
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        expected = load_file(tmp_path / "whole" / name)
        got = load_file(tmp_path / "resumed" / name)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
