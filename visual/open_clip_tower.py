"""Vision towers from open_clip: its own ViTs (incl. ViT-bigG-14) and timm-based SigLIP models.

open_clip and timm are imported inside the functions here, so the transformers path never pulls
them in. Per-patch tokens come from `visual.forward_intermediates(indices=[layer],
output_fmt="NLC", intermediates_only=True)`, which already splits off prefix tokens: the class
token of open_clip ViTs is dropped; timm SigLIP has none. Only the vision tower is kept; the
text tower is released right after loading.

`name_or_path`: a built-in model name ("ViT-L-14-336") with `pretrained` a tag ("openai") or a
weights file; "local-dir:/path" or "hf-hub:org/repo"; or a directory holding open_clip_config.json.

Preprocessing constants come from the model's preprocess cfg (size, mean, std, interpolation,
resize_mode). The center crop rounds like transformers ((h - c) // 2), which can sit half a
pixel from torchvision's CenterCrop on odd margins.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from visual.preprocessing import DEFAULT_ASPECT_RATIO, ImagePreprocessor, pads_to_square
from visual.tower import VisionTower, resolve_feature_layer

logger = logging.getLogger(__name__)

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "random": Image.Resampling.BICUBIC,  # a training-time augmentation; deterministic here
}


class OpenClipVisionTower(VisionTower):
    """Wraps `model.visual` of an open_clip model: a `VisionTransformer` or a timm `TimmModel`."""

    def __init__(
        self,
        visual: nn.Module,
        preprocessor: ImagePreprocessor,
        feature_layer: int = -2,
        settings: dict[str, Any] | None = None,
    ) -> None:
        trunk = getattr(visual, "trunk", None)
        if trunk is not None:  # timm model, e.g. SigLIP
            if not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
                raise ValueError(
                    f"timm trunk {type(trunk).__name__} is not a ViT with patch tokens"
                )
            grid, hidden, num_layers = (
                trunk.patch_embed.grid_size,
                trunk.embed_dim,
                len(trunk.blocks),
            )
        elif hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
            grid = visual.grid_size
            hidden = visual.transformer.width
            num_layers = len(visual.transformer.resblocks)
        else:
            raise ValueError(
                f"open_clip vision tower {type(visual).__name__} has no patch tokens; "
                "use a ViT or a timm ViT (SigLIP) model"
            )
        super().__init__(
            preprocessor=preprocessor,
            num_image_tokens=int(grid[0]) * int(grid[1]),
            hidden_size=int(hidden),
            feature_layer=feature_layer,
            settings=settings or {"library": "open_clip", "feature_layer": feature_layer},
            patch_grid=(int(grid[0]), int(grid[1])),
        )
        self.model = visual
        # Both backends index blocks from 0, so a negative hidden_states index maps 1:1.
        self._block_index = resolve_feature_layer(feature_layer, num_layers)
        self.freeze()

    def _patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model.forward_intermediates(
            pixel_values,
            indices=[self._block_index],
            stop_early=True,  # blocks after the feature layer are never needed
            intermediates_only=True,
            output_fmt="NLC",
        )
        return outputs["image_intermediates"][0]  # [n, N, Dv], prefix tokens removed


def preprocessor_from_open_clip_cfg(
    cfg: dict[str, Any], image_aspect_ratio: str
) -> ImagePreprocessor:
    """Build from an open_clip preprocess cfg dict (size, mean, std, interpolation, resize_mode)."""
    pad = pads_to_square(image_aspect_ratio)
    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resize_mode = cfg.get("resize_mode", "shortest")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"open_clip interpolation {interpolation!r} is not supported")
    common: dict[str, Any] = {
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "resample": int(_INTERPOLATIONS[interpolation]),
        "pad_to_square": pad,
    }
    if resize_mode == "squash":
        return ImagePreprocessor(resize_size=(height, width), **common)
    if resize_mode == "shortest":
        return ImagePreprocessor(
            shortest_edge=min(height, width), crop_size=(height, width), **common
        )
    raise ValueError(
        f"open_clip resize_mode {resize_mode!r} is not supported (use 'shortest' or 'squash'; "
        "image_aspect_ratio='pad' covers the letterbox case)"
    )


def open_clip_model_name(name_or_path: str) -> str:
    """A directory holding open_clip_config.json becomes a 'local-dir:' name; others pass through."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ValueError(f"{path} is a directory without open_clip_config.json")
        return f"local-dir:{path}"
    return name_or_path


def load_open_clip_tower(
    name_or_path: str,
    pretrained: str | None = None,
    feature_layer: int = -2,
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> OpenClipVisionTower:
    """Create an open_clip model, keep its vision tower, and wrap it as a `VisionTower`."""
    import open_clip

    model_name = open_clip_model_name(name_or_path)
    if model_name.startswith(("local-dir:", "hf-hub:")):
        pretrained = None  # open_clip ignores it for these schemas; keep settings honest
    model = open_clip.create_model(model_name, pretrained=pretrained)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    visual = model.visual
    del model  # drop the text tower now; only `visual` stays referenced
    if dtype is not None:
        visual = visual.to(dtype)
    if device is not None:
        visual = visual.to(device)
    settings = {
        "library": "open_clip",
        "name_or_path": str(name_or_path),
        "pretrained": pretrained,
        "feature_layer": feature_layer,
        "image_aspect_ratio": image_aspect_ratio,
    }
    preprocessor = preprocessor_from_open_clip_cfg(preprocess_cfg, image_aspect_ratio)
    return OpenClipVisionTower(visual, preprocessor, feature_layer, settings)
