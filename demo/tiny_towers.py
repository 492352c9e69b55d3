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


# A Qwen-VL visual encoder at toy size: 56 px / 14 = a 4x4 grid (the stored 16x16 ViT position
# table is resized down to it), 4 queries (2x2, so the resampler's key positions are resized up).
# n_queries is absent from the real config (visual.py's default is 256); a tiny one must say it.
TINY_QWEN_VL = {
    "image_size": 56,
    "patch_size": 14,
    "width": 32,
    "layers": 2,
    "heads": 4,
    "mlp_ratio": 2.0,
    "output_dim": 256,
    "n_queries": 4,
    "image_start_id": 151857,
}


def save_tiny_qwen_vl(
    path: str | Path,
    seed: int = 0,
    weights_format: str = "bin",
    num_shards: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    **visual: Any,
) -> Path:
    """Write a random Qwen-VL checkpoint in the release layout.

    config.json carries the `visual` section (TINY_QWEN_VL, updated by `visual`); the encoder's
    tensors, named `transformer.visual.*` and stored in `dtype` (bf16, as released), are spread
    over `num_shards` shards (`weights_format` "bin" or "safetensors") with their index json. The
    first shard holds only tensors of a stand-in language model, the others mix both, as in the
    released shards.
    """
    from visual.qwen_vl_checkpoint import PREFIX, QwenVLVisualConfig

    section = {**TINY_QWEN_VL, **visual}
    config = QwenVLVisualConfig.from_dict(section, "save_tiny_qwen_vl")
    generator = torch.Generator().manual_seed(seed)
    visual_state = {PREFIX + k: v for k, v in random_qwen_vl_state(config, generator).items()}
    lm_state = {
        "transformer.wte.weight": torch.randn(64, 16, generator=generator),
        "transformer.h.0.attn.c_attn.weight": torch.randn(48, 16, generator=generator),
        "transformer.ln_f.weight": torch.ones(16),
        "lm_head.weight": torch.randn(64, 16, generator=generator),
    }
    names = list(visual_state)
    chunks = [names[i :: num_shards - 1] for i in range(num_shards - 1)]  # shards 2..n: visual
    lm_names = list(lm_state)
    shards = [lm_names[:2], *[chunk + lm_names[2 + i : 3 + i] for i, chunk in enumerate(chunks)]]
    state = {k: v.to(dtype).contiguous() for k, v in {**lm_state, **visual_state}.items()}
    config_json = {"visual": section, "torch_dtype": str(dtype).removeprefix("torch.")}
    return _save_sharded(Path(path), state, shards, weights_format, config_json)


def random_qwen_vl_state(config: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values for every encoder tensor (module names), scaled like a trained one: unit
    LayerNorms with some spread, 1/sqrt(fan_in) matrices, the resampler's 2D sin-cos table."""
    from visual.qwen_vl_tower import expected_shapes

    state = {}
    for name, shape in expected_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if name == "attn_pool.pos_embed":
            state[name] = sincos_table(config.output_dim, int(config.n_queries**0.5))
        elif ".ln" in f".{name}" and name.endswith(".weight"):  # LayerNorm scales
            state[name] = 1.0 + 0.1 * noise
        elif len(shape) == 1:  # biases
            state[name] = 0.1 * noise
        else:  # matrices, the conv kernel, the query and position tables: 1/sqrt(last dims)
            fan_in = noise[0].numel() if len(shape) > 1 else 1
            state[name] = noise / fan_in**0.5
    return state


def sincos_table(dim: int, side: int) -> torch.Tensor:
    """MAE's 2D sin-cos table [side*side, dim]: first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1).float() * omega  # [side*side, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)  # [side*side, dim]


def _save_sharded(
    out: Path,
    state: dict[str, torch.Tensor],
    shards: list[list[str]],
    weights_format: str,
    config: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    if weights_format not in ("bin", "safetensors"):
        raise ValueError(f"weights_format={weights_format!r} is not one of bin, safetensors")
    out.mkdir(parents=True, exist_ok=True)
    stem = "pytorch_model" if weights_format == "bin" else "model"
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"{stem}-{number:05d}-of-{len(shards):05d}.{weights_format}"
        part = {name: state[name] for name in names}
        if weights_format == "bin":
            torch.save(part, out / file)
        else:
            save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.{weights_format}.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], **config}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
