"""The reference implementation: transformers' `LlavaForConditionalGeneration` holding OUR weights.

`build_reference_llava(vlm)` turns a VisionLanguageModel (transformers CLIP or SigLIP tower, 2-layer
MLP projector, native QWen LLM) into a stock LLaVA whose language model is a transformers `Qwen2`
(the exact QWen -> Qwen2 mapping of qwen1-spec.md C.6), and copies every weight across in its own
dtype. Both models then compute the same function in training mode (no dynamic NTK / logn), so
the same batch gives the same loss, and timing the two compares implementations, not models.

`apply_reference_lora` is the reference's counterpart of our `c_attn|w1|w2` LoRA: q/k/v (the
three slices of c_attn, adapted separately, so the reference trains 6rH instead of 4rH
attention-LoRA parameters per layer), gate_proj (w2) and up_proj (w1), matched by a full-match
regex under the language model only.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

from model.projector import MLPProjector
from model.vlm import VisionLanguageModel
from qwen import QWenLMHeadModel
from visual.hf_tower import HFVisionTower
from visual.tower import resolve_feature_layer

# LoRA targets of the reference, full-matched against module paths such as
# `model.language_model.layers.3.self_attn.q_proj`: never a vision-tower module.
REFERENCE_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj)|mlp\.(?:gate_proj|up_proj))"
)
REFERENCE_LORA_PER_LAYER = 5
# vision model_type -> LLaVA's vision_feature_select_strategy ("default" drops CLIP's class token)
_SELECT_STRATEGY = {"clip_vision_model": "default", "siglip_vision_model": "full"}


def _check_supported(vlm: VisionLanguageModel) -> None:
    """Raise ValueError naming what the VLM holds when LLaVA cannot reproduce it exactly."""
    if not isinstance(vlm.llm, QWenLMHeadModel):
        raise ValueError(
            "build_reference_llava needs a plain QWen LLM (QWenLMHeadModel, before LoRA is applied), "
            f"got {type(vlm.llm).__name__}"
        )
    config = vlm.llm.config
    if not config.no_bias or config.rotary_pct != 1.0:
        raise ValueError(
            f"Qwen2 cannot hold this QWen: no_bias={config.no_bias}, rotary_pct={config.rotary_pct} "
            "(Qwen2 has no MLP / o_proj biases and rotates the whole head)"
        )
    if not isinstance(vlm.vision, HFVisionTower):  # which only wraps CLIP and SigLIP models
        raise ValueError(
            "build_reference_llava needs a transformers CLIP or SigLIP vision tower "
            f"(HFVisionTower), got {type(vlm.vision).__name__}"
        )
    if not isinstance(vlm.projector, MLPProjector):
        raise ValueError(
            "build_reference_llava needs the mlp2x_gelu projector (LLaVA's), got "
            f"{type(vlm.projector).__name__}"
        )


def qwen2_config(config) -> Qwen2Config:
    """The Qwen2Config computing the same function as a QWenConfig in training (spec C.6)."""
    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        hidden_act="silu",
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": config.rotary_emb_base},
        max_position_embeddings=max(config.seq_length, config.max_position_embeddings),
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=config.attn_dropout_prob,
        use_cache=False,
    )


def reference_config(vlm: VisionLanguageModel) -> LlavaConfig:
    """LlavaConfig for `vlm`: its tower's own config, Qwen2 text config, its feature layer and ids."""
    _check_supported(vlm)
    tower = vlm.vision.model.config
    return LlavaConfig(
        vision_config=tower.to_dict(),
        text_config=qwen2_config(vlm.llm.config).to_dict(),
        image_token_id=vlm.image_token_id,
        image_seq_length=vlm.num_image_tokens,
        projector_hidden_act="gelu",  # exact (erf) GELU, as nn.GELU() in MLPProjector
        vision_feature_select_strategy=_SELECT_STRATEGY[tower.model_type],
        vision_feature_layer=resolve_feature_layer(
            vlm.vision.feature_layer, tower.num_hidden_layers
        ),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def qwen2_state_dict(llm: QWenLMHeadModel) -> dict[str, torch.Tensor]:
    """QWen weights under Qwen2 names (relative to LlavaModel.language_model), c_attn split in 3."""
    source = llm.state_dict()
    state = {
        "embed_tokens.weight": source["transformer.wte.weight"],
        "norm.weight": source["transformer.ln_f.weight"],
    }
    renames = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "mlp.w2.weight": "mlp.gate_proj.weight",  # w2 is the SiLU gate
        "mlp.w1.weight": "mlp.up_proj.weight",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    for i in range(llm.config.num_hidden_layers):
        ours, theirs = f"transformer.h.{i}.", f"layers.{i}."
        for old, new in renames.items():
            state[theirs + new] = source[ours + old]
        for kind in ("weight", "bias"):
            fused = source[f"{ours}attn.c_attn.{kind}"]  # [3H, H] or [3H]
            for name, part in zip(("q", "k", "v"), fused.chunk(3, dim=0), strict=True):
                state[f"{theirs}self_attn.{name}_proj.{kind}"] = part
    return state


@torch.no_grad()
def build_reference_llava(vlm: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """A stock LLaVA holding copies of `vlm`'s weights, each in its own dtype, on the same device.

    Call it before LoRA is applied to `vlm`. Modes follow ours: the vision tower stays in eval
    mode, the rest in the mode `vlm` is in. A mixed-dtype VLM (fp32 projector, bf16 LLM) runs
    under autocast, as the HF Trainer runs it with `bf16=True`.
    """
    config = reference_config(vlm)
    llm_weight = vlm.llm.get_input_embeddings().weight
    with torch.device(llm_weight.device):
        llava = AutoModelForImageTextToText.from_config(
            config, dtype=llm_weight.dtype, attn_implementation="sdpa"
        )
    if not isinstance(llava, LlavaForConditionalGeneration):
        raise TypeError(f"LlavaConfig built a {type(llava).__name__}, expected LLaVA")
    model = llava.model
    copy_weights(vlm.vision.model, model.vision_tower)
    copy_weights(vlm.projector, model.multi_modal_projector)
    model.language_model.load_state_dict(qwen2_state_dict(vlm.llm), strict=True)
    llava.lm_head.weight.copy_(vlm.llm.lm_head.weight)
    llava.requires_grad_(False)
    llava.train(vlm.training)
    model.vision_tower.eval()  # frozen towers never train (visual/tower.py)
    return llava


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the dtype of `source`, then copy every tensor (same names required)."""
    target.to(dtype=next(source.parameters()).dtype)
    target.load_state_dict(source.state_dict(), strict=True)


def apply_reference_lora(
    llava: LlavaForConditionalGeneration, rank: int, alpha: int, dropout: float
) -> PeftModel:
    """LoRA on the language model's q/k/v/gate/up projections; the projector trains in full.

    Everything else (vision tower, embeddings, norms, lm_head) is frozen. peft's LoRA weights
    start with B = 0, so the wrapped model computes exactly what `llava` did.
    """
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=REFERENCE_LORA_TARGETS,
        bias="none",
    )
    peft_model = get_peft_model(llava, lora)
    # requires_grad rather than modules_to_save: no second copy of the projector, and the same
    # parameter tensors stay reachable as `...multi_modal_projector.linear_1.weight`.
    llava.model.multi_modal_projector.requires_grad_(True)
    return peft_model


def reference_projector(model: nn.Module) -> nn.Module:
    """The LLaVA projector inside a reference model, peft-wrapped or not."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model.multi_modal_projector
