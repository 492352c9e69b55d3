"""peft's LoRA linear with less elementwise work: one-byte dropout masks that gradient
checkpointing keeps, the scaling applied at rank r, the update accumulated into the base output.

## Dropout masks

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

## The forward
peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the dropout's rescale runs over
[tokens, d_in], the scaling and the sum over [tokens, d_out], forward and backward. `FusedLoraLinear`
(a subclass of peft's `lora.Linear`, registered through `LoraConfig._register_custom_module`) computes
the same sum as `base(x).addmm_(lora_A(mask * x) * (scaling / (1 - p)), lora_B.weight.T)`: both
scalars meet at [tokens, r], and the low-rank product accumulates into the base output inside the
matmul. Equal up to float rounding. Anything else peft supports (several active adapters, DoRA
and the other variants, LoRA bias, merged or disabled adapters, mixed-adapter batches, dtype
casts, ZeRO-3's partitioned weights) takes peft's own forward.
"""

from __future__ import annotations

import functools

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
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
        return self.masked(x) * (1.0 / (1.0 - self.p))

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x with the dropped elements zeroed, not yet rescaled."""
        mask = torch.ops.qwen_vlm.dropout_keep_mask(x.detach(), 1.0 - self.p)
        return torch.where(mask, x, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear` whose plain case (one active adapter, vanilla LoRA) runs as
    `base(x) + (lora_A(dropout(x)) * scaling) @ lora_B.weight.T`, accumulated in place."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._plain_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        flat = x.reshape(-1, x.shape[-1])
        result = self.base_layer(flat)
        if isinstance(dropout, KeptMaskDropout) and dropout.training:
            flat, scaling = dropout.masked(flat), scaling / (1.0 - dropout.p)
        low = lora_A(flat) * scaling  # [tokens, r]
        return result.addmm_(low, lora_B.weight.t()).view(*x.shape[:-1], result.shape[-1])

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when the fused forward computes what peft's would, else None."""
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        if len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        dropout = self.lora_dropout[adapter]
        if lora_B.bias is not None or not isinstance(dropout, (KeptMaskDropout, nn.Identity)):
            return None
        weight = self.get_base_layer().weight
        if not x.dtype == lora_A.weight.dtype == lora_B.weight.dtype == weight.dtype:
            return None
        # ZeRO-3 leaves a partitioned weight empty outside its module's own call
        if lora_B.weight.shape != (lora_B.out_features, lora_B.in_features):
            return None
        return adapter


def fused_lora_config(config: LoraConfig) -> LoraConfig:
    """`config`, with `FusedLoraLinear` as the LoRA layer of every `nn.Linear` it targets. Not for
    quantized bases: bitsandbytes' layers subclass `nn.Linear` and need peft's own classes."""
    config._register_custom_module({nn.Linear: FusedLoraLinear})
    return config


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
