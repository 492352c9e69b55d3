"""Tiny random vision towers written as normal checkpoint directories, for tests and the demo.

Each `save_tiny_*` function writes what a real checkpoint has (transformers: config.json,
model.safetensors, preprocessor_config.json; open_clip: open_clip_config.json,
open_clip_model.safetensors), so `load_vision_tower(path, ...)` goes through the real loading
code. Weights are random but seeded. Building one takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visual.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

TINY_TIMM_SIGLIP = "vit_tiny_siglip_test"  # timm name registered by register_tiny_timm_siglip()
TINY_TIMM_SIGLIP_SIZE = (32, 8, 64, 2)  # image size, patch size, width, depth


def save_tiny_clip_tower(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    full_model: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random CLIP vision tower (or, with `full_model`, a whole `CLIPModel`)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(
        **_vit_dims(image_size, patch_size, hidden_size, num_layers, num_heads)
    )
    torch.manual_seed(seed)
    if full_model:
        model = CLIPModel(CLIPConfig(text_config=_tiny_text(), vision_config=vision.to_dict()))
    else:
        model = CLIPVisionModel(vision)
    preprocess = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    return _save_hf(model, Path(path), preprocess)


def save_tiny_siglip_tower(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    full_model: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random SigLIP vision tower (or, with `full_model`, a whole `SiglipModel`)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionConfig(
        **_vit_dims(image_size, patch_size, hidden_size, num_layers, num_heads)
    )
    torch.manual_seed(seed)
    if full_model:
        model = SiglipModel(SiglipConfig(text_config=_tiny_text(), vision_config=vision.to_dict()))
    else:
        model = SiglipVisionModel(vision)
    preprocess = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(SIGLIP_MEAN),
        "image_std": list(SIGLIP_STD),
    }
    return _save_hf(model, Path(path), preprocess)


def save_tiny_open_clip_tower(
    path: str | Path,
    kind: str = "vit",
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random open_clip model dir; kind "vit" (open_clip ViT) or "siglip" (timm trunk).

    The "siglip" kind uses a tiny timm model registered by `register_tiny_timm_siglip()` (its
    sizes are fixed: TINY_TIMM_SIGLIP_SIZE), so a process loading it must call that first; the
    image_size/patch_size/width/layers arguments apply to kind "vit" only.
    """
    import open_clip
    from safetensors.torch import save_file

    config = _open_clip_config(kind, image_size, patch_size, width, layers)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


def _open_clip_config(
    kind: str, image_size: int, patch_size: int, width: int, layers: int
) -> dict[str, Any]:
    """open_clip_config.json contents for a tiny model of `kind`."""
    text_cfg = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    if kind == "vit":
        vision_cfg: dict[str, Any] = {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": 32,
        }
        model_cfg: dict[str, Any] = {
            "embed_dim": 32,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
        }
        preprocess_cfg: dict[str, Any] = {
            "mean": list(OPENAI_CLIP_MEAN),
            "std": list(OPENAI_CLIP_STD),
        }
    elif kind == "siglip":
        register_tiny_timm_siglip()
        vision_cfg = {
            "image_size": TINY_TIMM_SIGLIP_SIZE[0],
            "timm_model_name": TINY_TIMM_SIGLIP,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        }
        model_cfg = {
            "embed_dim": 64,
            "custom_text": True,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
        }
        preprocess_cfg = {
            "mean": list(SIGLIP_MEAN),
            "std": list(SIGLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "squash",
        }
    else:
        raise ValueError(f"kind={kind!r} is not one of vit, siglip")
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def register_tiny_timm_siglip() -> None:
    """Register TINY_TIMM_SIGLIP with timm once per process (a SigLIP-shaped ViT: no CLS, MAP pool)."""
    import timm
    from timm.models import register_model

    if not timm.is_model(TINY_TIMM_SIGLIP):
        register_model(vit_tiny_siglip_test)


def vit_tiny_siglip_test(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """timm entry point of TINY_TIMM_SIGLIP (timm registers entry points by function name)."""
    from timm.models.vision_transformer import _create_vision_transformer

    img_size, patch_size, embed_dim, depth = TINY_TIMM_SIGLIP_SIZE
    args = {
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": 2,
        "class_token": False,
        "global_pool": "map",
    }
    return _create_vision_transformer(TINY_TIMM_SIGLIP, pretrained=pretrained, **{**args, **kwargs})


def _vit_dims(
    image_size: int, patch_size: int, hidden: int, layers: int, heads: int
) -> dict[str, int]:
    return {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }


def _tiny_text() -> dict[str, int]:
    return {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }


def _save_hf(model: torch.nn.Module, path: Path, preprocess: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2))
    return path
