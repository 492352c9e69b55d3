"""Preference tuning: the chunked answer log-probs, the pair batches, the DPO / IPO / RPO losses
against a direct full-logits computation, and `train.py --training_objective dpo` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import train_flags
from torch import nn

from dataset.conversation import IGNORE_INDEX, encode_prompt, encode_text
from dataset.preference import PreferenceCollator
from qwen.loss import sequence_log_probs
from runtime.preference import PreferenceObjective, preference_losses

VOCAB, HIDDEN = 300, 16


def direct_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the supervised next tokens from full `[B, T, V]` logits."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)  # [B, T-1]
    return (picked * keep).sum(dim=1)


@pytest.mark.parametrize("chunk_size", [1, 5, 512])
def test_sequence_log_probs_equal_full_logits_with_gradients(chunk_size):
    torch.manual_seed(0)
    lm_head = nn.Linear(HIDDEN, VOCAB)
    hidden = torch.randn(3, 12, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 12))
    labels[:, :6] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a row without answer tokens sums to 0
    got, counts = sequence_log_probs(hidden, labels, lm_head, chunk_size)
    weights = torch.tensor([1.0, -2.0, 0.5])  # rows weighted differently in the loss
    (got * weights).sum().backward()
    grads = [hidden.grad.clone(), lm_head.weight.grad.clone()]
    hidden.grad, lm_head.weight.grad, lm_head.bias.grad = None, None, None
    want = direct_log_probs(lm_head(hidden), labels)
    (want * weights).sum().backward()
    assert counts.tolist() == [6, 3, 0] and got[2].item() == 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for mine, theirs in zip(grads, [hidden.grad, lm_head.weight.grad], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_losses_match_their_formulas():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen (2 pairs), then rejected
    reference = torch.tensor([-3.5, -5.0, -3.0, -5.5])
    counts = torch.tensor([2, 4, 3, 5])
    beta = 0.1
    chosen = policy[:2] - reference[:2]
    rejected = policy[2:] - reference[2:]
    losses, chosen_rewards, rejected_rewards = preference_losses(
        policy, reference, counts, beta=beta
    )
    torch.testing.assert_close(losses, -F.logsigmoid(beta * (chosen - rejected)))
    torch.testing.assert_close(chosen_rewards, beta * chosen)
    torch.testing.assert_close(rejected_rewards, beta * rejected)
    ipo, _, _ = preference_losses(policy, reference, counts, beta=beta, loss_type="ipo")
    delta = chosen / counts[:2] - rejected / counts[2:]
    torch.testing.assert_close(ipo, (delta - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="--dpo_loss 'hinge'; allowed: sigmoid, ipo"):
        preference_losses(policy, reference, counts, beta=beta, loss_type="hinge")


def test_the_collator_puts_chosen_rows_then_rejected_rows(tokenizer):
    roles, contents = ["user", "assistant", "user"], ["<image>\nQ1", "A1", "Q2"]
    prompt = encode_prompt(tokenizer, roles, contents, image_token_id=5, num_image_tokens=3)
    end = tokenizer.im_end_id
    pairs = [
        {
            "prompt_ids": torch.tensor(prompt),
            "chosen_ids": torch.tensor(encode_text(tokenizer, "yes") + [end]),
            "rejected_ids": torch.tensor(encode_text(tokenizer, "no, not at all") + [end]),
            "pixel_values": torch.full((1, 3, 4, 4), float(i)),
        }
        for i in range(2)
    ]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    chosen_length = len(prompt) + len(pairs[0]["chosen_ids"])
    rejected_length = len(prompt) + len(pairs[0]["rejected_ids"])
    assert batch["input_ids"].shape == (4, rejected_length)
    assert batch["attention_mask"].sum(1).tolist() == [chosen_length] * 2 + [rejected_length] * 2
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert (batch["labels"][:, : len(prompt)] == IGNORE_INDEX).all()  # history never trains
    assert batch["labels"][2, len(prompt) :].tolist() == pairs[0]["rejected_ids"].tolist()
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0]  # once per pair


# --- through a tiny VLM ------------------------------------------------------------------------


@pytest.fixture(params=["qwen", "qwen2"])
def tiny_vlm(request, tiny_clip_dir):
    from test_chunked_loss import tiny_vlm as build

    return build(request.param, tiny_clip_dir, lm_head_trains=False)


def pair_batch(vlm, pairs: int = 2) -> dict:
    from test_chunked_loss import IMAGE_TOKEN_ID
    from test_chunked_loss import VOCAB as LLM_VOCAB

    generator = torch.Generator().manual_seed(3)
    samples = []
    for answer_lengths in ((4, 7), (6, 2))[:pairs]:
        prompt = torch.randint(10, LLM_VOCAB, (20,), generator=generator)
        prompt[2 : 2 + vlm.num_image_tokens] = IMAGE_TOKEN_ID
        answers = [torch.randint(10, LLM_VOCAB, (n,), generator=generator) for n in answer_lengths]
        samples.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": answers[0],
                "rejected_ids": answers[1],
                "pixel_values": torch.rand(1, 3, 32, 32, generator=generator),
            }
        )
    return PreferenceCollator(pad_token_id=0)(samples)


def direct_answer_log_probs(vlm, batch, projector) -> torch.Tensor:
    """Full logits through the LLM's own forward, images encoded per row with `projector`."""
    pixel_values = torch.cat([batch["pixel_values"]] * 2)
    features = vlm.project_features(vlm.vision(pixel_values), projector)
    inputs = vlm._spliced_inputs(batch["input_ids"], features)
    logits = vlm.llm(**inputs, attention_mask=batch["attention_mask"], use_cache=False).logits
    return direct_log_probs(logits, batch["labels"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_objective_equals_full_logits_and_its_reference_is_the_start(tiny_vlm, loss_type):
    vlm = tiny_vlm
    start_projector = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    objective = PreferenceObjective(vlm, beta=0.5, loss_type=loss_type, rpo_alpha=0.3)
    with torch.no_grad():  # the projector has trained since: the reference must not follow it
        for param in vlm.projector.parameters():
            param.add_(0.05)
    batch = pair_batch(vlm)
    loss, metrics = objective(vlm, vlm, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}
    vlm.zero_grad(set_to_none=True)

    policy = direct_answer_log_probs(vlm, batch, vlm.projector)
    reference_projector = objective.reference_projector
    for name, tensor in reference_projector.state_dict().items():
        torch.testing.assert_close(tensor, start_projector[name], rtol=0, atol=0)
    with torch.no_grad(), vlm.llm.disable_adapter():
        reference = direct_answer_log_probs(vlm, batch, reference_projector)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    losses, chosen, rejected = preference_losses(
        policy, reference, counts, beta=0.5, loss_type=loss_type
    )
    nll = -policy[:2].sum() / counts[:2].sum()
    want = losses.mean() + 0.3 * nll
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected, rtol=0, atol=1e-5)
    assert any("lora_" in n for n in grads) and any(n.startswith("projector.") for n in grads)
    for name, param in vlm.named_parameters():
        if param.requires_grad:
            assert param.grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=1e-5, msg=name)


def test_the_tower_runs_once_per_pair(tiny_vlm):
    vlm = tiny_vlm
    seen = []
    vlm.vision.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    objective = PreferenceObjective(vlm, beta=0.1, loss_type="sigmoid", rpo_alpha=None)
    objective(vlm, vlm, pair_batch(vlm))
    assert seen == [2]  # two pairs' images, once: not once per row, not again for the reference


def test_a_batch_without_images_runs_the_image_probe_in_the_policy_only(tiny_vlm):
    from test_chunked_loss import IMAGE_TOKEN_ID

    vlm = tiny_vlm
    batch = pair_batch(vlm)
    del batch["pixel_values"]
    batch["input_ids"][batch["input_ids"] == IMAGE_TOKEN_ID] = 11
    objective = PreferenceObjective(vlm, beta=0.1, loss_type="sigmoid", rpo_alpha=None)
    calls = []
    vlm.projector.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    loss, _ = objective(vlm, vlm, batch)
    assert calls == [1]  # the policy's probe (a blank image's features); the reference: none
    with torch.no_grad():
        inputs = vlm._spliced_inputs(batch["input_ids"], None)
        logits = vlm.llm(**inputs, attention_mask=batch["attention_mask"]).logits
        policy = direct_log_probs(logits, batch["labels"])
        with vlm.llm.disable_adapter():
            logits = vlm.llm(**inputs, attention_mask=batch["attention_mask"]).logits
        reference = direct_log_probs(logits, batch["labels"])
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    losses, _, _ = preference_losses(policy, reference, counts, beta=0.1)
    torch.testing.assert_close(loss, losses.mean(), rtol=0, atol=1e-5)


# --- train.py ----------------------------------------------------------------------------------


def write_pairs(shapes_dir: Path, out: Path, count: int | None = None) -> Path:
    """Shapes records as pairs: the history + last question, its answer chosen and another
    record's answer (or a refusal) rejected."""
    records = json.loads((shapes_dir / "train.json").read_text(encoding="utf-8"))[:count]
    answers = [r["conversations"][-1]["value"] for r in records]
    pairs = []
    for index, record in enumerate(records):
        chosen = answers[index]
        rejected = next((a for a in answers[index + 1 :] if a != chosen), "不知道")
        pairs.append({**record, "conversations": record["conversations"][:-1],
                      "chosen": chosen, "rejected": rejected})  # fmt: skip
    out.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.mark.slow
def test_train_py_dpo_starts_at_log_2_and_logs_the_rewards(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    import train

    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=2)  # one batch, every step
    flags = train_flags(
        tiny_qwen_dir, tiny_clip_dir, pairs, shapes_dir, tmp_path / "out",
        training_objective="dpo", max_steps=4, per_device_train_batch_size=2,
        eval_data_path=pairs, save_steps=4,
        learning_rate=1e-2, lr_scheduler_type="constant", lora_rank=4, lora_dropout=0.0,
    )  # fmt: skip
    trainer = train.main(flags)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    [evaluation] = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluation["step"] == 4 and evaluation["eval_loss"] < logs[0]["loss"]
    assert evaluation["eval_rewards/margins"] > 0 and "eval_rewards/accuracies" in evaluation
    assert not any(key.startswith("eval_") for key in logs[-1])  # training windows stay apart
    # The policy starts as the reference (LoRA B is zero, the projector copy is the projector)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert all(f"rewards/{k}" in logs[-1] for k in ("chosen", "rejected", "margins", "accuracies"))
    margins = [entry["rewards/margins"] for entry in logs]
    assert margins == sorted(margins) and margins[-1] > 0.01, margins  # it learns the preference
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="preference_record"):
        train.main(train_flags(tiny_qwen_dir, tiny_clip_dir, pairs, shapes_dir, tmp_path / "sft"))


def test_flags_are_checked():
    import train

    with pytest.raises(ValueError, match="--training_objective 'ppo' is not one of sft, dpo"):
        train.parse_args(["--training_objective", "ppo"])
    with pytest.raises(ValueError, match="--packing does not apply"):
        train.parse_args(["--training_objective", "dpo", "--packing"])
    with pytest.raises(ValueError, match="projector\\+llm has none"):
        train.parse_args(["--training_objective", "dpo", "--train_mode", "projector+llm"])
    with pytest.raises(ValueError, match="--dpo_beta must be positive"):
        train.parse_args(["--dpo_beta", "0"])


# --- --init_from: DPO on top of an SFT run, loaded like any checkpoint --------------------------


@pytest.mark.slow
def test_dpo_on_top_of_sft_loads_with_its_parent_merged(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    from conftest import answer_of_test_py, held_out

    import train
    from model.checkpoint import INIT_FROM, CheckpointError, load_vlm
    from model.lineage import load_merged

    common = {"lora_rank": 4, "lora_dropout": 0.0, "per_device_train_batch_size": 2}
    sft = tmp_path / "sft"
    sft_flags = train_flags(
        tiny_qwen_dir, tiny_clip_dir, shapes_dir / "train.json", shapes_dir, sft,
        max_steps=2, learning_rate=5e-2, **common,
    )  # fmt: skip
    train.main(sft_flags)
    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=4)
    dpo = tmp_path / "dpo"
    dpo_flags = train_flags(
        "ignored", "ignored", pairs, shapes_dir, dpo, training_objective="dpo",
        init_from=sft, max_steps=2, learning_rate=5e-2, **common,
    )  # fmt: skip
    trainer = train.main(dpo_flags)
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the SFT model is the reference

    description = json.loads((dpo / "vlm_config.json").read_text())
    assert description[INIT_FROM]["path"] == str(sft.resolve())
    assert description["language_model"]["language_model"] == str(Path(tiny_qwen_dir).resolve())
    loaded, _, _ = load_vlm(dpo, dtype="float32")
    trained = trainer.model.eval()
    batch = pair_batch_of(trainer)
    with torch.no_grad():
        want = trained(**batch, answer_log_probs=True).log_probs
        got = loaded(**batch, answer_log_probs=True).log_probs
        with loaded.llm.disable_adapter():  # without its own LoRA: the SFT model, merged
            parent = loaded(**batch, answer_log_probs=True).log_probs
        sft_model, _, _ = load_merged(sft, dtype="float32")
        sft_model.projector.load_state_dict(loaded.projector.state_dict())
        sft_log_probs = sft_model(**batch, answer_log_probs=True).log_probs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(parent, sft_log_probs, rtol=0, atol=1e-5)
    assert not torch.allclose(got, parent)  # DPO changed the model
    image, question = held_out(shapes_dir, 0)
    assert isinstance(answer_of_test_py(dpo, image, question), str)  # test.py loads it

    (sft / "projector.safetensors").write_bytes(b"changed")  # the parent is not what DPO started on
    with pytest.raises(CheckpointError, match="whose weights have changed since"):
        load_vlm(dpo, dtype="float32")


def pair_batch_of(trainer) -> dict:
    """The first batch of a trainer's data, on its collator, with the images' pixel values and
    sizes duplicated: one pair's rows through the plain forward need per-row images."""
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    batch["image_sizes"] = torch.cat([batch["image_sizes"]] * 2)
    return batch


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_the_same_run(
    tiny_qwen_dir, tiny_clip_dir, shapes_dir, tmp_path
):
    """`--precompute_ref_log_probs` through train.py: the logged losses and rewards of the run
    equal the run whose steps compute the reference themselves."""
    import train

    pairs = write_pairs(shapes_dir, tmp_path / "pairs.json", count=4)
    runs = {}
    for precompute in (False, True):
        flags = train_flags(
            tiny_qwen_dir, tiny_clip_dir, pairs, shapes_dir, tmp_path / f"out-{precompute}",
            training_objective="dpo", max_steps=3, per_device_train_batch_size=2,
            learning_rate=1e-2, lr_scheduler_type="constant", lora_rank=4, lora_dropout=0.0,
        )  # fmt: skip
        if precompute:
            flags.append("--precompute_ref_log_probs")
        trainer = train.main(flags)
        runs[precompute] = [e for e in trainer.state.log_history if "loss" in e]
        assert (trainer.train_dataset.reference_log_probs is not None) == precompute
    assert len(runs[True]) == 3
    for plain, cached in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert cached[key] == pytest.approx(plain[key], abs=1e-5), (key, plain, cached)
    assert abs(runs[True][-1]["rewards/chosen"]) > 1e-3  # the policy has left the reference
