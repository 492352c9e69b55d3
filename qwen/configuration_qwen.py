"""QWenConfig: the configuration of first-generation Qwen (Qwen-7B / Qwen-1.8B, `model_type "qwen"`).

It reads a released Qwen-7B `config.json` as-is (including the remote-code `auto_map`, which is
kept for the record but never followed) and adds `image_token_id` for the VLM splice. Importing
this module registers `model_type "qwen"` with `AutoConfig`, so no `trust_remote_code` is needed.
"""

from __future__ import annotations

import contextlib
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Keys a checkpoint's config.json must spell out: silently falling back to 7B defaults for any
# of them would build a model that cannot hold the weights.
ESSENTIAL_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_channels",
    "intermediate_size",
)
# Key names of the original Aug-2023 Qwen-7B config, which this class does not translate.
LEGACY_KEYS = ("n_embd", "n_head", "n_layer", "ffn_hidden_size")


class QWenConfig(PretrainedConfig):
    """Configuration of a QWen (v1) causal LM; defaults are Qwen-7B's.

    Notes on fields that behave differently from their names:
    - `intermediate_size` is twice the real MLP width (the MLP uses `intermediate_size // 2`).
    - `seq_length` is the training context: dynamic NTK and logn scaling start beyond it.
    - `max_position_embeddings` is bookkeeping only; the forward pass never reads it.
    - `bf16` / `fp16` / `fp32` / `use_flash_attn` are accepted and ignored: pass `dtype=` to
      `from_pretrained` instead.
    - `c_attn` always has a bias; `no_bias` governs the other linears (True for every release).
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    # Set by the VLM builder from the tokenizer (`tokenization_qwen.IMAGE_TOKEN`); None in a
    # plain Qwen-7B config, whose forward then takes no image_features.
    image_token_id: int | None = None
    # Accepted for compatibility with the released files; ignored by the native model.
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_flash_attn: str | bool = "auto"
    softmax_in_fp32: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    onnx_safe: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self._validate_sizes()
        super().__post_init__(**kwargs)

    def _validate_sizes(self) -> None:
        """Fail early, naming the fields, on shapes the forward pass cannot honour."""
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"QWenConfig: kv_channels ({self.kv_channels}) * num_attention_heads "
                f"({self.num_attention_heads}) = {self.kv_channels * self.num_attention_heads} "
                f"must equal hidden_size ({self.hidden_size}); c_attn's output is split by hidden_size."
            )
        if self.intermediate_size % 2:
            raise ValueError(
                f"QWenConfig: intermediate_size ({self.intermediate_size}) must be even; the MLP "
                "width is intermediate_size // 2."
            )
        rotary_dim = self.rotary_dim
        if not 2 < rotary_dim <= self.kv_channels or rotary_dim % 2:
            raise ValueError(
                f"QWenConfig: rotary_pct ({self.rotary_pct}) * kv_channels ({self.kv_channels}) "
                f"gives rotary dim {rotary_dim}; it must be even, > 2 and <= kv_channels."
            )
        if self.seq_length < 2:
            raise ValueError(f"QWenConfig: seq_length must be >= 2, got {self.seq_length}.")

    @property
    def mlp_width(self) -> int:
        """The width of w1 / w2 / c_proj in the MLP (half of `intermediate_size`)."""
        return self.intermediate_size // 2

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Number of leading head features rotated by RoPE."""
        return int(self.kv_channels * self.rotary_pct)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> QWenConfig:
        """Build from a `config.json` dict, refusing files that lack the model's sizes."""
        legacy = [key for key in LEGACY_KEYS if key in config_dict]
        missing = [key for key in ESSENTIAL_KEYS if key not in config_dict and key not in kwargs]
        if missing:
            hint = (
                f" It uses the old key names {legacy} of the Aug-2023 release; "
                "download the current config.json."
                if legacy
                else ""
            )
            raise ValueError(f"QWen config is missing required field(s) {missing}.{hint}")
        return super().from_dict(config_dict, **kwargs)


# Already registered (e.g. the module was imported under a second name): keep the first.
with contextlib.suppress(ValueError):
    AutoConfig.register("qwen", QWenConfig)
