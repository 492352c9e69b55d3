"""LoRA dropout with a one-byte mask that gradient checkpointing keeps instead of drawing again.

peft applies LoRA dropout with `nn.Dropout`, which on the CPU draws a float mask the size of the
adapted linear's input and keeps it (4 bytes an element) for the backward pass. With gradient
checkpointing every decoder layer runs its forward twice, so each mask is drawn twice: at the
width of Qwen2-0.5B that redraw was half of the 14.6% of a training step spent in
`aten::bernoulli_` (docs/PERFORMANCE.md).

`KeptMaskDropout` draws the mask as booleans through one operator, `qwen_vlm::dropout_keep_mask`,
and `checkpointing_kwargs` gives gradient checkpointing a selective policy
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`) that saves that operator's output
and recomputes everything else as plain checkpointing does. The mask costs one byte an element
until the layer's backward; the distribution is the same as `nn.Dropout`'s (keep with
probability 1 - p, scale kept values by 1 / (1 - p)), the random stream is not.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


@torch.library.custom_op(
    "qwen_vlm::dropout_keep_mask",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def dropout_keep_mask(like: torch.Tensor, keep: float) -> torch.Tensor:
    """A boolean tensor shaped like `like`, each element True with probability `keep`."""
    return torch.empty_like(like, dtype=torch.bool).bernoulli_(keep)


@dropout_keep_mask.register_fake
def _(like: torch.Tensor, keep: float) -> torch.Tensor:
    return torch.empty_like(like, dtype=torch.bool)


class KeptMaskDropout(nn.Module):
    """`nn.Dropout(p)` for 0 < p < 1 whose mask is one `dropout_keep_mask` call (booleans)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"KeptMaskDropout: p must be in (0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.ops.qwen_vlm.dropout_keep_mask(x.detach(), keep)
        return torch.where(mask, x, 0.0) * (1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keep_lora_dropout_masks(model: nn.Module) -> int:
    """Replaces the `nn.Dropout` of every peft LoRA layer in `model` by a `KeptMaskDropout` of the
    same p (LoRA layers without dropout hold `nn.Identity` and are left). Returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and 0.0 < dropout.p < 1.0:
                dropouts[adapter] = KeptMaskDropout(dropout.p)
                replaced += 1
    return replaced


def _keep_dropout_masks(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.qwen_vlm.dropout_keep_mask.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs() -> dict:
    """`gradient_checkpointing_kwargs` for transformers' `gradient_checkpointing_enable`: the
    non-reentrant checkpoint, saving the LoRA dropout masks and recomputing the rest."""
    return {
        "use_reentrant": False,
        "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_dropout_masks),
    }
