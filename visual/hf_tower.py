"""Vision towers from transformers checkpoints: CLIP and SigLIP.

`name_or_path` may be a full dual-encoder checkpoint (`CLIPModel`, `SiglipModel`; model_type
"clip" / "siglip") or a vision-only one ("clip_vision_model" / "siglip_vision_model"); the
config's model_type decides, never the path's spelling. Only the vision weights are loaded.

CLS handling follows the family: CLIP prepends a class token, which is dropped; SigLIP has none,
so every token is kept. Features are `hidden_states[feature_layer]`, i.e. block outputs before
any final LayerNorm, as LLaVA uses them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from visual.preprocessing import (
    DEFAULT_ASPECT_RATIO,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ImagePreprocessor,
    pads_to_square,
    preprocessor_from_hf_dict,
)
from visual.tower import VisionTower, resolve_feature_layer

logger = logging.getLogger(__name__)

# model_type of the vision part -> (has a class token to drop)
_FAMILIES = {"clip_vision_model": True, "siglip_vision_model": False}
_FULL_TO_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


class HFVisionTower(VisionTower):
    """Wraps a `CLIPVisionModel` or `SiglipVisionModel` (already built or loaded)."""

    def __init__(
        self,
        model: nn.Module,
        preprocessor: ImagePreprocessor,
        feature_layer: int = -2,
        settings: dict[str, Any] | None = None,
    ) -> None:
        config = model.config
        if config.model_type not in _FAMILIES:
            raise ValueError(
                f"unsupported vision model_type {config.model_type!r}; "
                f"supported: {', '.join(_FAMILIES)}"
            )
        grid = config.image_size // config.patch_size
        if preprocessor.output_size != (config.image_size, config.image_size):
            raise ValueError(
                f"preprocessing gives {preprocessor.output_size} images but the "
                f"{config.model_type} tower takes {config.image_size}x{config.image_size}"
            )
        super().__init__(
            preprocessor=preprocessor,
            num_image_tokens=grid * grid,  # patch tokens only: a CLIP class token is dropped
            hidden_size=config.hidden_size,
            feature_layer=feature_layer,
            settings=settings or {"library": "transformers", "feature_layer": feature_layer},
            patch_grid=(grid, grid),
        )
        self.model = model
        self.drop_class_token = _FAMILIES[config.model_type]
        # hidden_states has num_layers + 1 entries (embeddings first), so negative indices agree.
        self._hidden_index = resolve_feature_layer(feature_layer, config.num_hidden_layers)
        self.freeze()

    def _patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states[self._hidden_index]  # [n, (1+) N, Dv]
        return hidden[:, 1:] if self.drop_class_token else hidden  # [n, N, Dv]


def vision_model_class(model_type: str) -> type[nn.Module]:
    """The transformers class for a vision model_type (imported here, not at module import)."""
    if model_type == "clip_vision_model":
        from transformers import CLIPVisionModel

        return CLIPVisionModel
    if model_type == "siglip_vision_model":
        from transformers import SiglipVisionModel

        return SiglipVisionModel
    raise ValueError(f"unsupported vision model_type {model_type!r}")


def vision_config_of(config: Any, source: str) -> Any:
    """The vision sub-config of a full CLIP/SigLIP config, or the config itself if vision-only."""
    model_type = config.model_type
    if model_type in _FULL_TO_VISION:
        return config.vision_config
    if model_type in _FAMILIES:
        return config
    hint = " (SigLIP2 takes patchified variable-size inputs and is not supported)"
    raise ValueError(
        f"{source}: config model_type {model_type!r} is not a supported vision tower; use one of "
        f"{', '.join([*_FULL_TO_VISION, *_FAMILIES])}" + (hint if "siglip2" in model_type else "")
    )


def default_preprocessor(vision_config: Any, image_aspect_ratio: str) -> ImagePreprocessor:
    """Family defaults, for checkpoints without a preprocessor_config.json."""
    size = vision_config.image_size
    pad = pads_to_square(image_aspect_ratio)
    if vision_config.model_type == "clip_vision_model":
        return ImagePreprocessor(
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            shortest_edge=size,
            crop_size=(size, size),
            pad_to_square=pad,
        )
    return ImagePreprocessor(
        mean=SIGLIP_MEAN, std=SIGLIP_STD, resize_size=(size, size), pad_to_square=pad
    )


def load_hf_tower(
    name_or_path: str,
    feature_layer: int = -2,
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> HFVisionTower:
    """Load the vision part of a transformers CLIP/SigLIP checkpoint (hub id or local dir)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    vision_config = vision_config_of(config, name_or_path)
    if config.model_type in _FULL_TO_VISION:
        logger.info(
            "%s is a full %s checkpoint: loading its vision tower only (transformers reports the "
            "text-tower weights as UNEXPECTED; they are ignored)",
            name_or_path,
            config.model_type,
        )
    model_class = vision_model_class(vision_config.model_type)
    # Load fp32 unless told otherwise: v5 would otherwise keep the checkpoint's (often fp16) dtype.
    model = model_class.from_pretrained(
        name_or_path, config=vision_config, dtype=dtype or torch.float32
    )
    if device is not None:
        model = model.to(device)
    settings = {
        "library": "transformers",
        "name_or_path": str(name_or_path),
        "feature_layer": feature_layer,
        "image_aspect_ratio": image_aspect_ratio,
    }
    preprocessor = _load_preprocessor(name_or_path, vision_config, image_aspect_ratio)
    return HFVisionTower(model, preprocessor, feature_layer, settings)


def _load_preprocessor(
    name_or_path: str, vision_config: Any, image_aspect_ratio: str
) -> ImagePreprocessor:
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except OSError:
        logger.warning(
            "%s has no preprocessor_config.json; using %s defaults",
            name_or_path,
            vision_config.model_type,
        )
        return default_preprocessor(vision_config, image_aspect_ratio)
    return preprocessor_from_hf_dict(
        config, image_aspect_ratio, f"{name_or_path}/preprocessor_config.json"
    )
