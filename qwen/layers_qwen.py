"""QWen decoder layers with the checkpoint's names: RMSNorm, the SiLU-gated MLP, the block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_qwen import RESIDUAL_PROJECTION_ATTR, QWenAttention
from .configuration_qwen import QWenConfig


class QWenRMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class QWenMLP(nn.Module):
    """out = c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.c_proj = nn.Linear(config.mlp_width, config.hidden_size, bias=bias)
        setattr(self.c_proj, RESIDUAL_PROJECTION_ATTR, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    """Pre-norm decoder layer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        logn: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        # `use_cache` is only read by GradientCheckpointingLayer, which drops the cache when
        # it checkpoints a layer in training.
        attn_out = self.attn(
            self.ln_1(hidden_states),
            rotary=rotary,
            attention_mask=attention_mask,
            logn=logn,
            past_key_values=past_key_values,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.ln_2(hidden_states))
