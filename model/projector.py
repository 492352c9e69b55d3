"""Projectors: map frozen vision features [n_img, N, Dv] into the LLM's space [n_img, N', Dl].

The kind is a config value; `build_projector` is the one factory. `mlp2x_gelu` (LLaVA-1.5) keeps
every patch (N' = N); `resampler` (Qwen-VL, see model/resampler.py) compresses any N patches to a
fixed number of learnable queries. Every returned module has `num_output_tokens` = N', which the
data pipeline uses as the number of placeholder tokens per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.resampler import Resampler

PROJECTOR_KINDS = ("mlp2x_gelu", "resampler")


class MLPProjector(nn.Module):
    """Linear(Dv, Dl) - GELU - Linear(Dl, Dl), applied to every patch token."""

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, num_patches: int) -> None:
        super().__init__()
        self.num_output_tokens = num_patches
        self.linear_1 = nn.Linear(vision_hidden_size, llm_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n_img, N, Dv] -> [n_img, N, Dl]."""
        return self.linear_2(self.act(self.linear_1(features)))


def build_projector(
    kind: str,
    vision_hidden_size: int,
    llm_hidden_size: int,
    num_patches: int,
    **options: Any,
) -> nn.Module:
    """Build the projector named by `kind`; `options` go to it (resampler: num_queries, num_heads).

    Raises ValueError naming the allowed kinds for an unknown kind, and naming the option for
    one the kind does not take.
    """
    if kind == "mlp2x_gelu":
        if options:
            raise ValueError(
                f"projector kind 'mlp2x_gelu' takes no options, got {', '.join(sorted(options))}"
            )
        return MLPProjector(vision_hidden_size, llm_hidden_size, num_patches)
    if kind == "resampler":
        allowed = {"num_queries", "num_heads"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"projector kind 'resampler' does not take {', '.join(unknown)}; "
                f"options: {', '.join(sorted(allowed))}"
            )
        return Resampler(vision_hidden_size, llm_hidden_size, num_patches, **options)
    raise ValueError(f"projector kind {kind!r} is not one of {', '.join(PROJECTOR_KINDS)}")
