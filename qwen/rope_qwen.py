"""Rotary position embedding for QWen, with its inference-time length extrapolation.

QWen rotates q and k NeoX-style ("rotate half") in fp32 at absolute slot positions. Beyond the
training context `seq_length` it applies two inference-only tricks that transformers' built-in
RoPE variants do not reproduce:
- dynamic NTK: the RoPE base becomes `base * alpha ** (d / (d - 2))` for every position, with
  `alpha = max(1, 2 ** ceil(log2(L / S) + 1) - 1)` chosen once from the prefill length L;
- logn attention: queries at 0-based position p with p + 1 > S are scaled by log(p + 1) / log(S).
"""

from __future__ import annotations

import math

import torch


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha for a prompt of `length` tokens (1 when length <= seq_length)."""
    if length <= 0:
        return 1.0
    exponent = math.ceil(math.log2(length / seq_length) + 1)
    return float(max(2**exponent - 1, 1))


def ntk_alphas(lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Vectorised `ntk_alpha` over integer lengths `[B]` -> float32 alphas `[B]`."""
    lengths = lengths.to(torch.float64).clamp(min=1.0)
    exponent = torch.ceil(torch.log2(lengths / seq_length) + 1)
    return (torch.pow(2.0, exponent) - 1).clamp(min=1.0).to(torch.float32)


def rotary_cos_sin(
    positions: torch.Tensor, alpha: torch.Tensor, rotary_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos / sin tables for `positions [P, T]` and per-sample `alpha [A]`.

    P and A are each 1 or the batch size. Returns two tensors `[max(P, A), T, rotary_dim]`.
    """
    exponents = (
        torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device).float()
        / rotary_dim
    )  # [d/2]
    alpha = alpha.to(device=positions.device, dtype=torch.float64)
    # Keep the alpha == 1 case bit-identical to the plain base so parity with Qwen2 is exact.
    scaled_base = (base * alpha ** (rotary_dim / (rotary_dim - 2))).to(torch.float32)  # [A]
    inv_freq = 1.0 / (scaled_base[:, None] ** exponents[None, :])  # [A, d/2]
    freqs = positions[:, :, None].float() * inv_freq[:, None, :]  # [max(P,A), T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max(P,A), T, d]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """concat(-x2, x1) for x = concat(x1, x2) along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading `cos.shape[-1]` features of `x [B, heads, T, D]` in fp32.

    `cos` / `sin` are `[B or 1, T, rotary_dim]`; features past rotary_dim pass through.
    """
    rotary_dim = cos.shape[-1]
    x_rot = x[..., :rotary_dim].float()
    cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, rd]
    rotated = (x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def logn_factors(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query scale `[P, T]`: log(p + 1) / log(seq_length) where p + 1 > seq_length, else 1."""
    slots = positions.to(torch.float32) + 1
    scaled = torch.log(slots) / math.log(seq_length)
    return torch.where(slots > seq_length, scaled, torch.ones_like(scaled))
