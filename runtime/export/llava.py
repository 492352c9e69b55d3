"""Our VLM as transformers' `LlavaForConditionalGeneration`: the config and the weight mapping.

The one owner of the conversion, used by `python -m runtime.export` and by the benchmark's
reference model (bench/reference_llava.py). A VisionLanguageModel with a transformers CLIP or
SigLIP tower, the 2-layer GELU MLP projector and
- the native Qwen-7B LLM becomes a LLaVA whose text model is a transformers Qwen2 (the exact
  QWen -> Qwen2 mapping of qwen1-spec.md C.6: c_attn split into q/k/v with their biases, w2 ->
  gate_proj, w1 -> up_proj, MLP width intermediate_size / 2, untied head);
- any other transformers causal LM keeps its own text model and config.
Both compute the same function as ours, except Qwen-7B's dynamic NTK and logn attention, which are
active only beyond `seq_length` tokens at inference and have no Qwen2 counterpart
(`qwen_extrapolation_note` says so).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2Config,
)

from model.projector import MLPProjector
from model.vlm import VisionLanguageModel
from qwen import QWenLMHeadModel
from visual.hf_tower import HFVisionTower
from visual.tower import resolve_feature_layer

# vision model_type -> LLaVA's vision_feature_select_strategy ("default" drops CLIP's class token)
SELECT_STRATEGY = {"clip_vision_model": "default", "siglip_vision_model": "full"}
# tokens the tower emits beyond its patch grid (LlavaProcessor's num_additional_image_tokens)
CLASS_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
LANGUAGE_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"


def tokens_per_image(vlm: VisionLanguageModel) -> int:
    """The fixed grid's image tokens per image, asked of the model's image processor; a
    size-dependent one (AnyRes) is refused: LLaVA's `image_seq_length` is one number."""
    tokens = vlm.image_processor.fixed_num_image_tokens
    if tokens is None:
        raise ValueError(
            f"LLaVA holds a fixed number of tokens per image, but the image processor "
            f"{type(vlm.image_processor).__name__} gives a size-dependent number"
        )
    return tokens


def check_convertible(vlm: VisionLanguageModel, fixed_grid: bool = True) -> None:
    """Raise ValueError saying what LLaVA cannot hold, and what to use instead; `fixed_grid`
    False: the tokens per image may depend on its size (LLaVA-NeXT holds that)."""
    from peft import PeftModel  # imported where used: it imports bitsandbytes

    llm = vlm.llm
    if isinstance(llm, PeftModel):
        raise ValueError(
            "the LLM still carries LoRA adapters: convert it before LoRA is applied, or merge "
            "them first (peft merge_and_unload; `python -m runtime.export` does this)"
        )
    if isinstance(llm, QWenLMHeadModel):
        config = llm.config
        if not config.no_bias or config.rotary_pct != 1.0:
            raise ValueError(
                f"Qwen2 cannot hold this QWen: no_bias={config.no_bias}, rotary_pct="
                f"{config.rotary_pct} (Qwen2 has no MLP / o_proj biases and rotates the whole head)"
            )
    elif not isinstance(llm, PreTrainedModel) or llm.get_output_embeddings() is None:
        raise ValueError(
            "LLaVA needs a QWenLMHeadModel or a transformers causal LM (a PreTrainedModel with an "
            f"lm_head), got {type(llm).__name__}"
        )
    elif llm.config.model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"the LLM's model_type {llm.config.model_type!r} is remote code, unknown to "
            "transformers: a LLaVA built on it would not load without that code"
        )
    if not isinstance(vlm.vision, HFVisionTower):  # which only wraps CLIP and SigLIP models
        settings = getattr(vlm.vision, "settings", {})
        raise ValueError(
            f"LLaVA needs a transformers CLIP or SigLIP vision tower (HFVisionTower), got "
            f"{type(vlm.vision).__name__} (library {settings.get('library', '?')!r}); retrain the "
            "projector on a transformers checkpoint of the tower (e.g. "
            "openai/clip-vit-large-patch14-336 or google/siglip-so400m-patch14-384), or keep "
            "serving this model with test.py / runtime.inference"
        )
    if not isinstance(vlm.projector, MLPProjector):
        raise ValueError(
            "LLaVA needs the mlp2x_gelu projector (its multi_modal_projector), got "
            f"{type(vlm.projector).__name__}; `python -m runtime.merge` gives a standalone copy "
            "that this toolkit loads"
        )
    if fixed_grid:
        tokens_per_image(vlm)


def qwen2_config(config) -> Qwen2Config:
    """The Qwen2Config computing the same function as a QWenConfig up to `seq_length` tokens."""
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
        # exact up to seq_length only (dynamic NTK / logn start beyond it), so servers stop there
        max_position_embeddings=config.seq_length,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=config.attn_dropout_prob,
        architectures=["Qwen2ForCausalLM"],
    )


def qwen_extrapolation_note(config) -> str | None:
    """What the Qwen2 rewrite of a QWen config does not reproduce, or None."""
    features = [
        name
        for name, on in (("dynamic NTK RoPE scaling", config.use_dynamic_ntk),
                         ("logn attention scaling", config.use_logn_attn))
        if on
    ]  # fmt: skip
    if not features:
        return None
    return (
        f"Qwen-7B's {' and '.join(features)} (active at inference only when a sequence is longer "
        f"than seq_length = {config.seq_length} tokens) have no Qwen2 equivalent: the exported "
        f"model computes the same function up to {config.seq_length} tokens and differs beyond, "
        f"so max_position_embeddings is {config.seq_length}"
    )


def text_config(llm: nn.Module):
    """The text model's config: Qwen2 for the native QWen, the LLM's own config otherwise."""
    if isinstance(llm, QWenLMHeadModel):
        return qwen2_config(llm.config)
    return llm.config


def llava_config(vlm: VisionLanguageModel, image_seq_length: int | None = None) -> LlavaConfig:
    """LlavaConfig for `vlm`: its tower's own config, the text config, its feature layer and ids.
    `image_seq_length` None: the fixed grid's tokens per image (LLaVA-NeXT gives its base tile's)."""
    check_convertible(vlm, fixed_grid=image_seq_length is None)
    tower = vlm.vision.model.config
    text = text_config(vlm.llm)
    return LlavaConfig(
        vision_config=_portable(tower.to_dict()),
        text_config={**_portable(text.to_dict()), "use_cache": True},  # training turns it off
        image_token_id=vlm.image_token_id,
        image_seq_length=image_seq_length or tokens_per_image(vlm),
        projector_hidden_act="gelu",  # exact (erf) GELU, as nn.GELU() in MLPProjector
        vision_feature_select_strategy=SELECT_STRATEGY[tower.model_type],
        vision_feature_layer=resolve_feature_layer(
            vlm.vision.feature_layer, tower.num_hidden_layers
        ),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def _portable(config: dict) -> dict:
    """A sub-config without the local path it was loaded from."""
    return {key: value for key, value in config.items() if key != "_name_or_path"}


def qwen2_state_dict(llm: QWenLMHeadModel) -> dict[str, torch.Tensor]:
    """QWen weights under Qwen2 names (relative to LlavaModel.language_model), c_attn split in 3.

    The q/k/v parts are copies, not views: `save_pretrained` treats tensors sharing storage as
    tied weights and would drop all but one of them.
    """
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
                state[f"{theirs}self_attn.{name}_proj.{kind}"] = part.clone()
    return state


def language_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's weights under LLaVA's names (`model.language_model.*` and `lm_head.weight`)."""
    if isinstance(llm, QWenLMHeadModel):
        inner = qwen2_state_dict(llm)
    else:
        inner = getattr(llm, llm.base_model_prefix).state_dict()
    state = {LANGUAGE_PREFIX + name: tensor for name, tensor in inner.items()}
    state[LM_HEAD] = llm.get_output_embeddings().weight
    return state


def llava_state_dict(vlm: VisionLanguageModel, fixed_grid: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of `vlm` under `LlavaForConditionalGeneration`'s names, in its own dtype
    (`fixed_grid` as `check_convertible`'s: LLaVA-NeXT shares these names)."""
    check_convertible(vlm, fixed_grid)
    state = {VISION_PREFIX + k: v for k, v in vlm.vision.model.state_dict().items()}
    state.update({PROJECTOR_PREFIX + k: v for k, v in vlm.projector.state_dict().items()})
    state.update(language_state_dict(vlm.llm))
    return state


def saved_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the vision tower under `vision_model.`, as in the LLaVA checkpoints written
    before transformers 5 (what vLLM, SGLang and transformers 4 read); transformers 5 strips the
    prefix again on load (its CLIPVisionModel / SiglipVisionModel PrefixChange)."""
    return {
        VISION_PREFIX + "vision_model." + name[len(VISION_PREFIX) :]
        if name.startswith(VISION_PREFIX)
        else name: tensor
        for name, tensor in state.items()
    }


@torch.no_grad()
def build_llava(vlm: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """A stock LLaVA holding copies of `vlm`'s weights, each part in its own dtype, on its device."""
    config = llava_config(vlm)
    llm_weight = vlm.llm.get_input_embeddings().weight
    with torch.device(llm_weight.device):
        llava = AutoModelForImageTextToText.from_config(
            config, dtype=llm_weight.dtype, attn_implementation="sdpa"
        )
    if not isinstance(llava, LlavaForConditionalGeneration):
        raise TypeError(f"LlavaConfig built a {type(llava).__name__}, expected LLaVA")
    llava.model.vision_tower.to(dtype=next(vlm.vision.model.parameters()).dtype)
    llava.model.multi_modal_projector.to(dtype=next(vlm.projector.parameters()).dtype)
    llava.load_state_dict(llava_state_dict(vlm), strict=True)
    return llava
