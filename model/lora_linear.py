"""peft's LoRA linear with less elementwise work: one-byte dropout masks, the scaling applied at
rank r, the low-rank update accumulated into the base output.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`, with `nn.Dropout`, which on the
CPU draws a float mask the size of the adapted linear's input, rescales it, and keeps it (4 bytes
an element) for the backward pass; the scaling and the sum then run over [tokens, d_out], forward
and backward. At Qwen2-0.5B's width those masks were 15% of a training step and the scaling, the
sum and the rescale most of another 10% (docs/PERFORMANCE.md).

`FusedLoraLinear` (a subclass of peft's `lora.Linear`, registered through
`LoraConfig._register_custom_module`) computes the same sum as
`base(x).addmm_(lora_A(mask * x) * (scaling / (1 - p)), lora_B.weight.T)`: both scalars meet at
[tokens, r], and the low-rank product accumulates into the base output inside the matmul. The
mask is drawn as booleans (`BoolMaskDropout`: one byte an element, kept for the backward pass
instead of a float); its distribution is `nn.Dropout`'s (keep with probability 1 - p, scale kept
values by 1 / (1 - p)), its random stream is not. Equal to peft's forward up to float rounding.
Anything else peft supports (several active adapters, DoRA and the other variants, LoRA bias,
merged or disabled adapters, mixed-adapter batches, dtype casts, autocast) takes peft's own
forward. ZeRO-3 gathers a partitioned weight when it is read, so the fused path runs there too.
Boolean masks are drawn on the CPU; on other devices `BoolMaskDropout` is torch's dropout (CUDA's
fused kernel keeps a boolean mask already) and the fused forward runs without dropout only.

Under gradient checkpointing the recompute draws each mask again from the restored RNG state (the
same mask). Keeping the masks instead (a selective checkpoint policy) was measured faster on this
CPU but cost ~0.5 GB at 2 x 1024 tokens for Qwen2-0.5B, against the memory checkpointing is for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class BoolMaskDropout(nn.Module):
    """`nn.Dropout(p)` for 0 < p < 1 whose mask is booleans (one byte an element)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"BoolMaskDropout: p must be in (0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return self.masked(x) * (1.0 / (1.0 - self.p))

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x (on the CPU) with the dropped elements zeroed, not yet rescaled."""
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - self.p)
        return torch.where(mask, x, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear` whose plain case (one active adapter, vanilla LoRA) runs as
    `base(x) + (lora_A(dropout(x)) * scaling) @ lora_B.weight.T`, accumulated in place: a forward
    hook on the base layer sees its output with the LoRA update already added."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._plain_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        flat = x.reshape(-1, x.shape[-1])
        result = self.base_layer(flat)
        if isinstance(dropout, BoolMaskDropout) and dropout.training:
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
        if lora_B.bias is not None or not isinstance(dropout, (BoolMaskDropout, nn.Identity)):
            return None
        if isinstance(dropout, BoolMaskDropout) and dropout.training and x.device.type != "cpu":
            return None
        if torch.is_autocast_enabled(x.device.type):  # addmm_ is in place: autocast skips it
            return None
        weight = self.get_base_layer().weight
        if not x.dtype == lora_A.weight.dtype == lora_B.weight.dtype == weight.dtype:
            return None
        return adapter


def fused_lora_config(config: LoraConfig) -> LoraConfig:
    """`config`, with `FusedLoraLinear` as the LoRA layer of every `nn.Linear` it targets. Not for
    quantized bases: bitsandbytes' layers subclass `nn.Linear` and need peft's own classes."""
    config._register_custom_module({nn.Linear: FusedLoraLinear})
    return config


def use_bool_mask_dropout(model: nn.Module) -> int:
    """Replaces the `nn.Dropout` of every peft LoRA layer in `model` by a `BoolMaskDropout` of the
    same p (LoRA layers without dropout hold `nn.Identity` and are left). Returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and 0.0 < dropout.p < 1.0:
                dropouts[adapter] = BoolMaskDropout(dropout.p)
                replaced += 1
    return replaced
