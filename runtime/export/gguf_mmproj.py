"""The vision tower and projector as a llama.cpp `mmproj` GGUF (architecture `clip`).

llama.cpp's `tools/mtmd` runs a CLIP or SigLIP ViT with the LLaVA projector (`clip.projector_type
= "mlp"`: mm.0 -> GELU -> mm.2) through one graph (`models/llava.cpp`). What it relies on, read
from `clip-impl.h` / `clip.cpp` (docs/GGUF.md lists them):

- a class embedding (`v.class_embd`, CLIP) is prepended and then skipped when the projector takes
  the patch rows: LLaVA's "default" strategy; without one (SigLIP) every row is kept ("full");
- `clip.vision.feature_layer = [k]` makes the encoder stop after block k and hand the projector
  `hidden_states[k]` (0 = embeddings); `v.post_ln` would be applied to that output, so it is not
  written (our features are taken before the post-layernorm);
- the block MLP's activation is quick-GELU unless `clip.use_gelu` (SigLIP's GELU) is set;
- `ffn_up` is fc1 and `ffn_down` fc2 (loaded by shape when fc1 and fc2 are square, so the
  tower's intermediate size must differ from its hidden size).
"""

from __future__ import annotations

import gguf
import torch

from model.projector import MLPProjector
from visual.hf_tower import HFVisionTower
from visual.tower import resolve_feature_layer

ARCH = "clip"
PROJECTOR_TYPE = "mlp"
TOWERS = ("clip_vision_model", "siglip_vision_model")
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
# (layer name in our tower, llama.cpp's) outside the blocks; absent ones are skipped
EMBEDDING_NAMES = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",  # SigLIP
    "embeddings.class_embedding": "v.class_embd",  # CLIP
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",  # CLIP (transformers' spelling)
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
QUICK_GELU = "quick_gelu"


def check_vision(vlm) -> None:
    """Raise ValueError naming what llama.cpp's LLaVA-style mmproj cannot hold."""
    if not isinstance(vlm.vision, HFVisionTower):
        library = getattr(vlm.vision, "settings", {}).get("library", "?")
        raise ValueError(
            f"llama.cpp's mmproj needs a transformers CLIP or SigLIP tower, got "
            f"{type(vlm.vision).__name__} (library {library!r})"
        )
    config = vlm.vision.model.config
    if config.model_type not in TOWERS:
        raise ValueError(f"vision model_type {config.model_type!r} is not one of {TOWERS}")
    if config.intermediate_size == config.hidden_size:
        raise ValueError(
            f"the tower's intermediate_size equals its hidden_size ({config.hidden_size}): "
            "llama.cpp would take its fc1/fc2 for a legacy swapped pair and exchange them"
        )
    if not isinstance(vlm.projector, MLPProjector):
        raise ValueError(
            f"llama.cpp's mmproj holds the mlp2x_gelu projector, got {type(vlm.projector).__name__}"
        )


def feature_layer(vlm) -> int:
    """Our feature layer as an index into hidden_states counted from the embeddings (0)."""
    layers = vlm.vision.model.config.num_hidden_layers
    return layers + 1 + resolve_feature_layer(vlm.vision.feature_layer, layers)


def mmproj_tensors(vlm) -> dict[str, torch.Tensor]:
    """The tower (up to the feature layer) and projector under llama.cpp's names, in file order."""
    tower = vlm.vision.model.state_dict()  # transformers 5: no vision_model level
    state = {theirs: tower[ours] for ours, theirs in EMBEDDING_NAMES.items() if ours in tower}
    for i in range(feature_layer(vlm)):  # later blocks never run
        for ours, theirs in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                state[f"v.blk.{i}.{theirs}.{kind}"] = tower[f"encoder.layers.{i}.{ours}.{kind}"]
    projector = vlm.projector.state_dict()
    for ours, theirs in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        for kind in ("weight", "bias"):
            state[f"{theirs}.{kind}"] = projector[f"{ours}.{kind}"]
    return state


def add_mmproj_hparams(writer: gguf.GGUFWriter, vlm) -> None:
    """The clip.* keys of the tower, its feature layer, preprocessing and projector."""
    config = vlm.vision.model.config
    preprocessor = vlm.vision.preprocessor
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_image_size(preprocessor.output_size[0])
    writer.add_vision_patch_size(config.patch_size)
    writer.add_vision_embedding_length(config.hidden_size)
    writer.add_vision_feed_forward_length(config.intermediate_size)
    writer.add_vision_block_count(feature_layer(vlm))
    writer.add_vision_projection_dim(vlm.projector.linear_2.out_features)
    writer.add_vision_head_count(config.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(float(config.layer_norm_eps))
    writer.add_vision_image_mean([float(m) for m in preprocessor.mean])
    writer.add_vision_image_std([float(s) for s in preprocessor.std])
    writer.add_array("clip.vision.feature_layer", [feature_layer(vlm)])
    if config.hidden_act != QUICK_GELU:  # quick-GELU is llama.cpp's default
        writer.add_vision_use_gelu(True)
