"""QWen self-attention (fused q|k|v projection, RoPE, optional logn scaling, SDPA, KV cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import find_packed_sequence_indices

from .configuration_qwen import QWenConfig
from .rope_qwen import apply_rotary

# Marks the c_proj linears that write into the residual stream; they get the smaller init
# N(0, initializer_range / sqrt(2 * num_hidden_layers)).
RESIDUAL_PROJECTION_ATTR = "_qwen_residual_projection"


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask `[B|1, 1, T, K]` (True = attend), or None when SDPA needs no mask.

    `attention_mask` is the 2-D `[B, K]` padding mask over past + current slots (1 = real token).
    The causal part is by slot: query slot `past_length + i` sees key slots `<= past_length + i`.
    None means: no padding, and either a fresh prompt (SDPA's `is_causal`) or a single decode
    token (which may see every key).

    Packed rows (no `attention_mask`, no cache, `position_ids` restarting inside a row) get a
    block-diagonal causal mask: a token sees only earlier tokens of its own sample. Segments are
    found by transformers' own rule (`find_packed_sequence_indices`: a new one starts wherever a
    position is not its predecessor + 1), so one packed batch isolates samples in any
    transformers LLM as well.
    """
    if attention_mask is None and past_length == 0 and position_ids is not None:
        segments = find_packed_sequence_indices(position_ids.view(-1, query_length))  # [B, T]
        if segments is not None:
            return _packed_mask(segments.to(device))
    key_length = past_length + query_length
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past_length == 0 or query_length == 1):
        return None
    if attention_mask is not None and (
        attention_mask.ndim != 2 or attention_mask.shape[1] != key_length
    ):
        raise ValueError(
            f"QWen: attention_mask must be a 2-D [batch, past + current = {key_length}] padding "
            f"mask, got shape {tuple(attention_mask.shape)}."
        )
    query_slots = torch.arange(past_length, key_length, device=device)  # [T]
    key_slots = torch.arange(key_length, device=device)  # [K]
    mask = (key_slots[None, :] <= query_slots[:, None])[None, None]  # [1, 1, T, K]
    if padded:
        mask = (
            mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        )  # [B, 1, T, K]
        # A padding query may see no key at all; let it see everything so SDPA stays finite
        # (its output is never used: padding carries no loss and is never generated from).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def _packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """Causal and same-segment mask `[B, 1, T, T]` from segment indices `[B, T]`."""
    length = segments.shape[1]
    slots = torch.arange(length, device=segments.device)
    causal = slots[None, :] <= slots[:, None]  # [T, T]
    same = segments[:, :, None] == segments[:, None, :]  # [B, T, T]
    return (causal[None] & same)[:, None]  # [B, 1, T, T]


class QWenAttention(nn.Module):
    """Multi-head attention with the checkpoint's names: `c_attn` (q|k|v, with bias) and `c_proj`."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.hidden_size = config.hidden_size
        self.dropout = config.attn_dropout_prob
        # The released checkpoints carry a c_attn bias whatever `no_bias` says.
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)
        setattr(self.c_proj, RESIDUAL_PROJECTION_ATTR, True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        logn: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """`hidden_states [B, T, H]` -> `[B, T, H]`; appends the rotated k / v to the cache."""
        batch, length, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states)  # [B, T, 3H]
        query, key, value = qkv.split(self.hidden_size, dim=-1)  # 3 x [B, T, H]
        shape = (batch, length, self.num_heads, self.head_dim)
        query = query.view(shape).transpose(1, 2)  # [B, nh, T, hd]
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)

        cos, sin = rotary
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        if logn is not None:
            query = (query * logn[:, None, :, None]).to(value.dtype)  # logn: [B|1, T]

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [B, nh, K, hd]

        # No mask means a fresh unpadded prompt (causal) or one decode token (sees all keys).
        is_causal = attention_mask is None and length > 1
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # [B, nh, T, hd]
        out = out.transpose(1, 2).reshape(batch, length, self.hidden_size)  # [B, T, H]
        return self.c_proj(out)
