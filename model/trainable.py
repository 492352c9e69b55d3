"""The one place that decides what trains.

`projector`: projector only (stage 1, alignment). `projector+lora`: projector + LoRA adapters on
the LLM's linears (stage 2). `projector+llm`: projector + every LLM weight. The vision tower is
always frozen. LoRA targets are matched by a full-match regex on module paths *inside the LLM*, so
a vision tower's `q_proj` can never be hit.
"""

from __future__ import annotations

import logging
import re

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from model.config import LoraSettings
from model.lora_linear import fused_lora_config, use_bool_mask_dropout
from model.peft_wrapping import quiet_peft_wrapping
from model.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)


def module_names(value: str | None, flag: str) -> list[str] | None:
    """`"c_attn|w1|w2"` -> ["c_attn", "w1", "w2"], rejecting anything that is not a name."""
    if value is None:
        return None
    names = [name.strip() for name in value.split("|") if name.strip()]
    if not names or any(not re.fullmatch(r"[A-Za-z_][\w.]*", name) for name in names):
        raise ValueError(
            f"{flag} {value!r}: expected module names separated by '|', e.g. 'c_attn|w1'"
        )
    return names


def lora_target_regex(target_modules: str) -> str:
    """`"c_attn|w1|w2"` -> a regex peft full-matches against paths such as `transformer.h.0.mlp.w1`."""
    names = module_names(target_modules, "--target_modules")
    return r"(?:.*\.)?(?:" + "|".join(re.escape(name) for name in names) + r")"


def configure_trainable(
    vlm: VisionLanguageModel,
    settings: LoraSettings,
    *,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
) -> VisionLanguageModel:
    """Freezes and unfreezes in place (wrapping the LLM with peft for LoRA); logs a table."""
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    if quantized:
        # Also upcasts every non-quantized LLM weight (embeddings, norms, lm_head) to fp32, as
        # QLoRA does: the residual stream runs in fp32 around the 4-bit matmuls.
        with quiet_peft_wrapping():
            vlm.llm = prepare_model_for_kbit_training(
                vlm.llm,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    elif gradient_checkpointing:
        vlm.llm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    if settings.train_mode == "projector+lora":
        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=lora_target_regex(settings.target_modules),
            modules_to_save=module_names(settings.modules_to_save, "--modules_to_save"),
            bias="none",
        )
        if not quantized:
            lora = fused_lora_config(lora)
        with quiet_peft_wrapping():
            vlm.llm = get_peft_model(vlm.llm, lora)
        use_bool_mask_dropout(vlm.llm)
    elif settings.train_mode == "projector+llm":
        vlm.llm.requires_grad_(True)
    vlm.vision.requires_grad_(False)
    log_trainable(vlm)
    return vlm


def count_parameters(module: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def log_trainable(vlm: VisionLanguageModel) -> None:
    rows = [
        (name, *count_parameters(getattr(vlm, name))) for name in ("vision", "projector", "llm")
    ]
    lines = [f"{'component':<10} {'trainable':>14} {'total':>14}"]
    lines += [f"{name:<10} {t:>14,} {n:>14,}" for name, t, n in rows]
    logger.info("parameters:\n%s", "\n".join(lines))
