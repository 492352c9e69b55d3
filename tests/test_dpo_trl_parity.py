"""Our preference loss equals TRL's `DPOTrainer` on the same model exported to transformers'
`LlavaForConditionalGeneration`: loss, chosen / rejected rewards, and the gradients of every
trainable weight (LoRA and projector), fp32, to 1e-5, for DPO (sigmoid), IPO and RPO.

TRL's side: a real `trl.DPOTrainer` (1.16.0) built around the exported LLaVA with a `peft_config`
(LoRA on the language model's linears, the projector in `modules_to_save`), so its reference is
its own: the adapter disabled, which also swaps the projector back to its original copy. The test
calls `DPOTrainer._compute_loss(model, inputs, return_outputs)`, the method its public
`compute_loss` wraps: it takes one prepared batch (`input_ids`, `attention_mask`,
`completion_mask`, `pixel_values`, chosen rows then rejected rows, as its vision collator builds
them), runs the policy and reference forwards and returns the loss, recording the mean rewards in
`_metrics`. `compute_loss` itself only adds an activation-offload context; `training_step` would
also step nothing we compare. Its rows carry one image each, so the pair's pixel values are
repeated for the rejected rows (our batch carries them once per pair).
"""

from __future__ import annotations

import pytest
import torch
from test_chunked_loss import CHUNK, HIDDEN, IMAGE_TOKEN_ID, tiny_llm
from test_dpo import pair_batch

from dataset.conversation import IGNORE_INDEX
from model.config import LoraSettings
from model.projector import build_projector
from model.trainable import configure_trainable
from model.vlm import VisionLanguageModel
from runtime.export.llava import build_llava
from runtime.preference import PreferenceObjective
from visual import load_vision_tower

trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install trl==1.16.0")

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
BETA, RPO_ALPHA = 0.5, 0.3


def ours_and_llava(tiny_clip_dir):
    """Our LoRA VLM (Qwen2 LLM, LoRA B drawn at random) and a LLaVA export of its base."""
    llm = tiny_llm("qwen2")
    llm.config.lm_loss_chunk_size = CHUNK
    vision = load_vision_tower(str(tiny_clip_dir))
    projector = build_projector("mlp2x_gelu", vision.hidden_size, HIDDEN, vision.num_image_tokens)
    vlm = VisionLanguageModel(vision, projector, llm, IMAGE_TOKEN_ID)
    llava = build_llava(vlm)  # the base, before LoRA
    settings = LoraSettings(
        lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules="|".join(TARGETS)
    )
    configure_trainable(vlm, settings)
    with torch.no_grad():
        for name, param in vlm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return vlm.train(), llava


def tiny_processor():
    """The smallest processor DPOTrainer accepts for a vision model (it reads the pad token)."""
    from tokenizers import Tokenizer, models
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<image>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    return LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


def trl_trainer(llava, tmp_path, loss_type: str, rpo: bool):
    from datasets import Dataset
    from peft import LoraConfig

    losses, weights = [loss_type], [1.0]
    if rpo:
        losses, weights = [loss_type, "sft"], [1.0, RPO_ALPHA]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=losses, loss_weights=weights,
        report_to=[], use_cpu=True, per_device_train_batch_size=2, max_length=None,
    )  # fmt: skip
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
        target_modules=r".*language_model.*\.(?:" + "|".join(TARGETS) + ")",
        modules_to_save=["multi_modal_projector"],
    )  # fmt: skip
    data = Dataset.from_dict(
        {"images": [["x.png"]], "prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}
    )
    return trl.DPOTrainer(
        model=llava,
        args=args,
        train_dataset=data,
        processing_class=tiny_processor(),
        peft_config=lora,
    )


def layer_key(name: str) -> str:
    return name[name.index("layers.") :]


def copy_trained_weights(vlm, trainer) -> None:
    """TRL's adapter := ours; its trainable projector copy := our (moved) projector."""
    ours = {layer_key(n): p for n, p in vlm.llm.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.copy_(ours[layer_key(name)])
            elif "multi_modal_projector.modules_to_save" in name:
                param.copy_(vlm.projector.get_parameter(name.split("default.", 1)[1]))


def trl_inputs(batch: dict) -> dict:
    completion_mask = (batch["labels"] != IGNORE_INDEX).long()
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion_mask,
        "pixel_values": torch.cat([batch["pixel_values"]] * 2),  # one image per row
    }


def gradients(named) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in named if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(
    ("loss_type", "rpo"), [("sigmoid", False), ("ipo", False), ("sigmoid", True)]
)
def test_loss_rewards_and_gradients_equal_trls(tiny_clip_dir, tmp_path, loss_type, rpo):
    vlm, llava = ours_and_llava(tiny_clip_dir)
    objective = PreferenceObjective(
        vlm, beta=BETA, loss_type=loss_type, rpo_alpha=RPO_ALPHA if rpo else None
    )
    trainer = trl_trainer(llava, tmp_path, loss_type, rpo)
    with torch.no_grad():  # the projector has trained: both references keep the starting one
        for param in vlm.projector.parameters():
            param.add_(0.03)
    copy_trained_weights(vlm, trainer)
    batch = pair_batch(vlm)

    loss, metrics = objective(vlm, vlm, batch)
    loss.backward()
    ours = gradients(vlm.named_parameters())

    trainer.model.train()
    theirs_loss = trainer._compute_loss(trainer.model, trl_inputs(batch), return_outputs=False)
    theirs_loss.backward()
    theirs = gradients(trainer.model.named_parameters())
    recorded = trainer._metrics["train"]

    assert abs(loss.item() - theirs_loss.item()) <= 1e-5, (loss.item(), theirs_loss.item())
    assert abs(loss.item() - 0.6931) > 1e-3  # policy and reference differ: not a trivial match
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].mean().item() == pytest.approx(recorded[name][-1], abs=1e-5), name
    lora = {layer_key(n): g for n, g in ours.items() if "lora_" in n}
    theirs_lora = {layer_key(n): g for n, g in theirs.items() if "lora_" in n}
    assert lora.keys() == theirs_lora.keys() and len(lora) == 2 * len(TARGETS) * 2
    for key, grad in lora.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, theirs_lora[key], rtol=0, atol=1e-5, msg=key)
    projector = {n.split(".", 1)[1]: g for n, g in ours.items() if n.startswith("projector.")}
    theirs_projector = {
        n.split("default.", 1)[1]: g for n, g in theirs.items() if "multi_modal_projector" in n
    }
    assert projector.keys() == theirs_projector.keys() and projector
    for key, grad in projector.items():
        torch.testing.assert_close(grad, theirs_projector[key], rtol=0, atol=1e-5, msg=key)
