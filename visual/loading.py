"""`load_vision_tower`: the one entry point that picks a backend by the `library` setting."""

from __future__ import annotations

import torch

from visual.preprocessing import default_aspect_ratio, pads_to_square
from visual.tower import VisionTower

LIBRARIES = ("transformers", "open_clip", "qwen_vl")


def load_vision_tower(
    name_or_path: str,
    library: str = "transformers",
    feature_layer: int = -2,
    image_aspect_ratio: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    pretrained: str | None = None,
) -> VisionTower:
    """Load a frozen vision tower.

    library="transformers": `name_or_path` is a hub id or a local dir of a CLIP/SigLIP
    checkpoint (full or vision-only). library="open_clip": a model name (with `pretrained`, a
    tag or weights file), "local-dir:/path", "hf-hub:org/repo", or a dir with
    open_clip_config.json. library="qwen_vl": the visual encoder of a Qwen-VL / Qwen-VL-Chat
    checkpoint dir or hub id, or a tower made by `python -m visual.qwen_vl extract`.
    `image_aspect_ratio` None takes the library's own (`default_aspect_ratio`: Qwen-VL's resize,
    LLaVA's pad for the others). `feature_layer` follows the hidden_states convention (-2 = LLaVA's penultimate layer); for
    qwen_vl the resampler output is appended to that list, so -1 selects it (see
    visual/qwen_vl_tower.py). `dtype` defaults to float32. The returned tower's `settings`
    rebuild it: `load_vision_tower(**tower.settings)`.
    """
    image_aspect_ratio = image_aspect_ratio or default_aspect_ratio(library)
    pads_to_square(image_aspect_ratio)  # fail on a bad flag before loading any weights
    if library == "transformers":
        if pretrained is not None:
            raise ValueError("pretrained= applies to library='open_clip' only")
        from visual.hf_tower import load_hf_tower

        return load_hf_tower(name_or_path, feature_layer, image_aspect_ratio, dtype, device)
    if library == "open_clip":
        from visual.open_clip_tower import load_open_clip_tower

        return load_open_clip_tower(
            name_or_path, pretrained, feature_layer, image_aspect_ratio, dtype, device
        )
    if library == "qwen_vl":
        if pretrained is not None:
            raise ValueError("pretrained= applies to library='open_clip' only")
        from visual.qwen_vl_tower import load_qwen_vl_tower

        return load_qwen_vl_tower(name_or_path, feature_layer, image_aspect_ratio, dtype, device)
    raise ValueError(f"library={library!r} is not one of {', '.join(LIBRARIES)}")
