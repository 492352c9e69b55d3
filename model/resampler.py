"""Qwen-VL style resampler: a fixed set of learnable queries cross-attends to the patch features.

Any square grid of N patches is compressed to `num_queries` output tokens (Qwen-VL: 256), so the
LLM sees the same number of image tokens whatever the tower. Design (Qwen-VL `Resampler`):
- kv = ln_kv(kv_proj(features)): patch features projected to the LLM width Dl;
- query = ln_q(learnable queries) + 2D sin-cos position (on the queries' own sqrt(Q) grid);
- key = kv + the same position table, bicubically resized to the patch grid; value = kv, no position;
- one multi-head cross-attention, then ln_post and a bias-free projection.
This is the trainable projector; `visual/qwen_vl_tower.py`'s `QwenVLAttentionPool` is the frozen
Qwen-VL tower's own pretrained pool. They stay two classes because their parameters differ in
layout (a stored position table and Qwen-VL's checkpoint names there, a fixed buffer and
`nn.MultiheadAttention` here); the position resize is shared.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from visual.qwen_vl_tower import resize_positions  # Qwen-VL's get_abs_pos, one copy


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed MAE-style 2D sin-cos table [grid*grid, dim]: first half encodes rows, second columns."""
    if dim % 4 != 0:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid] each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs  # [grid*grid, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid*grid, D/2]

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # [grid*grid, D]


class Resampler(nn.Module):
    """[n_img, N, Dv] -> [n_img, num_queries, Dl] for any square N."""

    def __init__(
        self,
        vision_hidden_size: int,
        llm_hidden_size: int,
        num_patches: int,
        num_queries: int = 256,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        grid = math.isqrt(num_queries)
        if num_queries < 1 or grid * grid != num_queries:
            raise ValueError(f"resampler num_queries must be a square number, got {num_queries}")
        # Qwen-VL uses 128-wide heads (4096 / 32).
        num_heads = num_heads or max(1, llm_hidden_size // 128)
        if llm_hidden_size % num_heads:
            raise ValueError(
                f"resampler num_heads={num_heads} does not divide llm_hidden_size={llm_hidden_size}"
            )
        self.num_output_tokens = num_queries
        self.num_patches = num_patches  # what the tower gives; forward accepts any square N
        self.query = nn.Parameter(torch.empty(num_queries, llm_hidden_size))  # [Q, Dl]
        # Fixed, recomputed on construction, so it is not stored in checkpoints.
        self.register_buffer("pos_embed", sincos_2d(llm_hidden_size, grid), persistent=False)
        self.kv_proj = nn.Linear(vision_hidden_size, llm_hidden_size, bias=False)
        self.ln_q = nn.LayerNorm(llm_hidden_size, eps=1e-6)
        self.ln_kv = nn.LayerNorm(llm_hidden_size, eps=1e-6)
        self.attn = nn.MultiheadAttention(llm_hidden_size, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(llm_hidden_size, eps=1e-6)
        self.proj = nn.Linear(llm_hidden_size, llm_hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        nn.init.trunc_normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n_img, N, Dv] -> [n_img, Q, Dl]."""
        if features.dim() != 3:
            raise ValueError(f"resampler input must be [n_img, N, Dv], got {tuple(features.shape)}")
        n_img, num_patches, _ = features.shape
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"resampler needs a square grid of patches to place 2D positions; got N={num_patches}"
            )
        kv = self.ln_kv(self.kv_proj(features))  # [n_img, N, Dl]
        key_pos = resize_positions(self.pos_embed, num_patches).to(kv.dtype)  # [N, Dl]
        query = self.ln_q(self.query) + self.pos_embed.to(self.query.dtype)  # [Q, Dl]
        query = query.unsqueeze(0).expand(n_img, -1, -1)  # [n_img, Q, Dl]
        out, _ = self.attn(query, kv + key_pos, kv, need_weights=False)  # [n_img, Q, Dl]
        return self.proj(self.ln_post(out))  # [n_img, Q, Dl]
