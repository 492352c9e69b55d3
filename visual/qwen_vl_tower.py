"""Qwen-VL's visual encoder as a frozen tower: a ViT-bigG/14 at 448 px and the pretrained
cross-attention resampler that turns its 1024 patches into 256 tokens of width 4096.

The module below is a native reimplementation of Qwen-VL's remote-code `visual.py` (never
imported or run); its parameter names are the checkpoint's `transformer.visual.*` names with the
prefix removed, so the 594 tensors load one to one (see `visual/qwen_vl.py`). The facts that are
easy to get wrong, each checked against an independent reference in tests/test_qwen_vl_tower.py:

- the ViT's fused `attn.in_proj` rows are grouped per head (heads x (q, k, v) x head_dim), while
  the resampler's `attn.in_proj_weight` is the usual [Wq; Wk; Wv];
- the ViT position table has 256 rows (16x16) whatever the image size, and is resized bicubically
  (in float32) to the patch grid; the resampler's keys get its 2D sin-cos table resized the same
  way, its queries the table as stored, its values none;
- exact (erf) GELU, LayerNorm eps 1e-6 everywhere, no masks, no class token;
- `proj` is used as `x @ proj`, not as a Linear weight.

`feature_layer` indexes this tower's stack of outputs, the transformers `hidden_states` list with
the tower's own output appended: [embeddings, block 1 .. block L, resampler]. So -1 (and L + 1)
is Qwen-VL's image embedding (resampler + ln_post + proj: [n, 256, 4096]), what Qwen-VL feeds its
LLM; -2 (and L) is the last ViT block's patches, [n, 1024, 1664] at 448 px, and -3 the block
before, and so on.

Preprocessing is Qwen-VL's: RGB, PIL bicubic resize straight to image_size x image_size, no crop,
OpenAI-CLIP mean/std. `image_aspect_ratio="resize"` is exactly that; "pad" first pads the image to
a square with the mean colour (LLaVA's choice), which keeps the aspect ratio but shows the
encoder letterboxed images it was not trained on, so a warning names the difference. (As for
every tower, `visual/image_io.py` composites transparent images on white, where Qwen-VL's
`convert("RGB")` drops the alpha channel.)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visual.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TOWER_ASPECT_RATIOS,
    ImagePreprocessor,
    pads_to_square,
)
from visual.qwen_vl_checkpoint import (
    POSITION_TABLE_ROWS,
    QwenVLVisualConfig,
    checkpoint_dir,
    read_visual_config,
    read_visual_tensors,
)
from visual.tower import VisionTower

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6


def resize_positions(table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A square position table [S*S, C] -> [G*G, C] for G*G = num_tokens, bicubic in float32
    (Qwen-VL's `get_abs_pos`); rows are row-major (t = row * side + col) on both sides."""
    source, target = int(table.shape[0] ** 0.5), int(num_tokens**0.5)
    if source == target:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)  # [1, C, S, S]
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(target * target, -1).to(table.dtype)  # [G*G, C]


class ViTAttention(nn.Module):
    """Bidirectional self-attention whose fused qkv rows are grouped per head."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.in_proj(x).view(batch, tokens, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [B, H, T, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd], scale 1/sqrt(hd)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))  # [B, T, W]


class ViTBlock(nn.Module):
    """Pre-LN block: x += attn(ln_1 x); x += mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = ViTAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=nn.GELU(),  # exact erf GELU
                c_proj=nn.Linear(mlp_width, width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViTBlocks(nn.Module):
    """Holds `resblocks`, so parameter names read `transformer.resblocks.N...` as stored."""

    def __init__(self, config: QwenVLVisualConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ViTBlock(config.width, config.heads, config.mlp_width) for _ in range(config.layers)
        )


class PoolAttention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention`'s parameters and [Wq; Wk; Wv]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, h, L, d]
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, Q, d]
        return self.out_proj(out.transpose(1, 2).flatten(2))  # [B, Q, E]


class QwenVLAttentionPool(nn.Module):
    """`attn_pool`: n_queries learned queries cross-attend to the ViT patches. Qwen-VL calls it
    `Resampler`; renamed so it is not confused with the trainable projector of the same design
    (`model/resampler.py`), whose parameters are laid out differently."""

    def __init__(self, config: QwenVLVisualConfig) -> None:
        super().__init__()
        dim = config.output_dim
        self.query = nn.Parameter(torch.empty(config.n_queries, dim))
        self.pos_embed = nn.Parameter(torch.empty(config.n_queries, dim))  # 2D sin-cos, stored
        # visual.py only projects when the widths differ (Identity, and no tensor, otherwise).
        self.kv_proj = (
            nn.Linear(config.width, dim, bias=False) if config.width != dim else nn.Identity()
        )
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = PoolAttention(dim, config.pool_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))  # [B, T, E]
        key = kv + resize_positions(self.pos_embed, x.shape[1])  # keys: positions resized to T
        query = self.ln_q(self.query) + self.pos_embed  # [Q, E], the table as stored
        return self.attn(query.expand(x.shape[0], -1, -1), key, kv)  # values: no position


class QwenVLVisual(nn.Module):
    """Qwen-VL's `VisionTransformer`: pixels [B, 3, S, S] -> [B, n_queries, output_dim]."""

    def __init__(self, config: QwenVLVisualConfig) -> None:
        super().__init__()
        self.config = config
        width, patch = config.width, config.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(POSITION_TABLE_ROWS, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = ViTBlocks(config)
        self.attn_pool = QwenVLAttentionPool(config)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(config.output_dim, config.output_dim))

    def forward(self, pixel_values: torch.Tensor, last_block: int | None = None) -> torch.Tensor:
        """The resampler output, or with `last_block` k (1-based) block k's patches [B, T, W]."""
        x = self.conv1(pixel_values)  # [B, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W], token t = row * G + col
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        for index, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if index == last_block:
                return x  # [B, T, W]
        x = self.ln_post(self.attn_pool(x))  # [B, Q, E]
        return x @ self.proj  # [B, Q, E]; proj is [in, out]


def expected_shapes(config: QwenVLVisualConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name (without `transformer.visual.`) and its shape, for `config`."""
    with torch.device("meta"):
        model = QwenVLVisual(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def resolve_output_layer(feature_layer: int, num_layers: int) -> int | None:
    """None for the resampler output (-1 or L + 1), else the 1-based ViT block (module doc)."""
    if feature_layer in (-1, num_layers + 1):
        return None
    if 1 <= feature_layer <= num_layers:
        return feature_layer
    if -(num_layers + 1) <= feature_layer <= -2:
        return num_layers + 2 + feature_layer
    raise ValueError(
        f"feature_layer={feature_layer} is out of range for the Qwen-VL encoder: -1 is the "
        f"resampler output, -2..-{num_layers + 1} (or {num_layers}..1) the ViT block outputs"
    )


class QwenVLVisionTower(VisionTower):
    """Wraps a loaded `QwenVLVisual`; `feature_layer` picks the resampler or a ViT block."""

    def __init__(
        self,
        model: QwenVLVisual,
        preprocessor: ImagePreprocessor,
        feature_layer: int = -1,
        settings: dict[str, Any] | None = None,
    ) -> None:
        config = model.config
        if preprocessor.output_size != (config.image_size, config.image_size):
            raise ValueError(
                f"preprocessing gives {preprocessor.output_size} images but the Qwen-VL encoder "
                f"takes {config.image_size}x{config.image_size}"
            )
        self._last_block = resolve_output_layer(feature_layer, config.layers)
        resampled = self._last_block is None
        super().__init__(
            preprocessor=preprocessor,
            num_image_tokens=config.n_queries if resampled else config.grid**2,
            hidden_size=config.output_dim if resampled else config.width,
            feature_layer=feature_layer,
            settings=settings or {"library": "qwen_vl", "feature_layer": feature_layer},
        )
        self.model = model
        self.freeze()

    def _patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, last_block=self._last_block)  # [n, N, Dv]


def qwen_vl_preprocessor(image_size: int, image_aspect_ratio: str) -> ImagePreprocessor:
    """Qwen-VL's own transform (squash to a square, bicubic, CLIP mean/std), optionally padded."""
    return ImagePreprocessor(
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resize_size=(image_size, image_size),
        resample=int(Image.Resampling.BICUBIC),
        pad_to_square=pads_to_square(image_aspect_ratio),
    )


def load_qwen_vl_tower(
    name_or_path: str,
    feature_layer: int = -1,
    image_aspect_ratio: str = TOWER_ASPECT_RATIOS["qwen_vl"],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> QwenVLVisionTower:
    """Load `transformer.visual.*` of a Qwen-VL(-Chat) checkpoint dir, hub id or extracted tower.

    Every name and shape is checked before the module gets any weight, so a bad checkpoint
    raises an error naming the file and the tensor and never leaves a half-loaded tower.
    """
    path = checkpoint_dir(name_or_path)
    config, _ = read_visual_config(path)
    resolve_output_layer(feature_layer, config.layers)  # a bad flag fails before reading weights
    if pads_to_square(image_aspect_ratio):
        logger.warning(
            "image_aspect_ratio='pad' pads images to a square before Qwen-VL's resize; the "
            "encoder was trained on unpadded images squashed to %dpx ('resize')",
            config.image_size,
        )
    state = read_visual_tensors(path, expected_shapes(config), dtype or torch.float32)
    with torch.device("meta"):
        model = QwenVLVisual(config)
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model = model.to(device)
    settings = {
        "library": "qwen_vl",
        "name_or_path": str(name_or_path),
        "feature_layer": feature_layer,
        "image_aspect_ratio": image_aspect_ratio,
    }
    preprocessor = qwen_vl_preprocessor(config.image_size, image_aspect_ratio)
    tower = QwenVLVisionTower(model, preprocessor, feature_layer, settings)
    logger.info(
        "Qwen-VL encoder from %s: %s, %d tokens of width %d per image",
        Path(name_or_path),
        "resampler output" if tower._last_block is None else f"ViT block {tower._last_block}",
        tower.num_image_tokens,
        tower.hidden_size,
    )
    return tower
