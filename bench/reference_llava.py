"""The reference implementation: transformers' `LlavaForConditionalGeneration` holding OUR weights.

`build_reference_llava(vlm)` turns a VisionLanguageModel (transformers CLIP or SigLIP tower, 2-layer
MLP projector, native QWen LLM) into a stock LLaVA whose language model is a transformers `Qwen2`,
through the conversion `python -m runtime.export` writes (runtime/export/llava.py owns it: the
exact QWen -> Qwen2 mapping of qwen1-spec.md C.6), each weight copied in its own dtype. Both models
then compute the same function in training mode (no dynamic NTK / logn), so the same batch gives
the same loss, and timing the two compares implementations, not models.

An AnyRes VLM (`model.anyres.AnyResProjector`) becomes a `LlavaNextForConditionalGeneration`
instead, through the LLaVA-NeXT export's mapping (runtime/export/llava_next.py: the same names plus
`image_grid_pinpoints` and `model.image_newline`); it takes its own processor's inputs
(`pixel_values` [n_img, max tiles, 3, S, S], `image_sizes`) and lays out the tiles itself.

`apply_reference_lora` is the reference's counterpart of our LoRA: `reference_lora_targets` turns
our `--target_modules` into the Qwen2 modules that hold the same weights (QWen's c_attn -> q/k/v,
adapted separately, so the reference trains 6rH instead of 4rH attention-LoRA parameters per layer;
attn / mlp c_proj -> o_proj / down_proj; w1 -> up_proj; w2 -> gate_proj; a Qwen2 LLM's names stay),
matched by a full-match regex under the language model only.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from model.anyres import AnyResProjector
from model.vlm import VisionLanguageModel
from runtime.export.llava import build_llava
from runtime.export.llava_next import llava_next_config, llava_next_state_dict

# Our LoRA target names -> the Qwen2 modules (under a decoder layer) that hold those weights.
QWEN_TO_QWEN2_LINEARS = {
    "c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "c_proj": ("self_attn.o_proj", "mlp.down_proj"),
    "w1": ("mlp.up_proj",),
    "w2": ("mlp.gate_proj",),
}
QWEN2_LINEARS = {
    **{name: (f"self_attn.{name}",) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: (f"mlp.{name}",) for name in ("gate_proj", "up_proj", "down_proj")},
}


def reference_lora_targets(target_modules: str, native: bool) -> str:
    """Our `--target_modules` ("c_attn|w1|w2") -> a regex full-matched against the reference's
    module paths such as `model.language_model.layers.3.self_attn.q_proj`: never a vision-tower
    module. `native`: our LLM is QWen (converted to Qwen2 for the reference)."""
    table = QWEN_TO_QWEN2_LINEARS if native else QWEN2_LINEARS
    names = [name.strip() for name in target_modules.split("|") if name.strip()]
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(
            f"--target_modules {target_modules!r}: the reference has no counterpart of "
            f"{', '.join(unknown)} (known: {', '.join(table)})"
        )
    paths = [path.replace(".", r"\.") for name in names for path in table[name]]
    return r"model\.language_model\.layers\.\d+\.(?:" + "|".join(paths) + ")"


@torch.no_grad()
def build_reference_llava(
    vlm: VisionLanguageModel,
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A stock LLaVA (LLaVA-NeXT for an AnyRes `vlm`) holding copies of `vlm`'s weights, each in
    its own dtype, on the same device.

    Call it before LoRA is applied to `vlm`. Modes follow ours: the vision tower stays in eval
    mode, the rest in the mode `vlm` is in. A mixed-dtype VLM (fp32 projector, bf16 LLM) runs
    under autocast, as the HF Trainer runs it with `bf16=True`. No KV cache: it only trains.
    """
    anyres = isinstance(vlm.projector, AnyResProjector)
    llava = build_llava_next(vlm) if anyres else build_llava(vlm)
    llava.config.text_config.use_cache = False
    llava.requires_grad_(False)
    llava.train(vlm.training)
    llava.model.vision_tower.eval()  # frozen towers never train (visual/tower.py)
    return llava


@torch.no_grad()
def build_llava_next(vlm: VisionLanguageModel) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT holding copies (never views: both models train) of an AnyRes `vlm`'s weights,
    each part in its own dtype: the LLM's, the tower's, and the projector's for `image_newline`,
    which trains with the projector in ours."""
    llm_weight = vlm.llm.get_input_embeddings().weight
    with torch.device(llm_weight.device):
        model = AutoModelForImageTextToText.from_config(
            llava_next_config(vlm), dtype=llm_weight.dtype, attn_implementation="sdpa"
        )
    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise TypeError(f"LlavaNextConfig built a {type(model).__name__}, expected LLaVA-NeXT")
    model.model.vision_tower.to(dtype=next(vlm.vision.model.parameters()).dtype)
    projector_dtype = next(vlm.projector.parameters()).dtype
    model.model.multi_modal_projector.to(dtype=projector_dtype)
    model.model.image_newline.data = model.model.image_newline.data.to(projector_dtype)
    model.load_state_dict(llava_next_state_dict(vlm), strict=True)  # copies into its own tensors
    return model


def trainable_image_path(model: nn.Module) -> list[nn.Parameter]:
    """What trains in the reference besides LoRA: the projector, and LLaVA-NeXT's image_newline."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    params = list(base.model.multi_modal_projector.parameters())
    newline = getattr(base.model, "image_newline", None)
    return params + ([newline] if newline is not None else [])


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the dtype of `source`, then copy every tensor (same names required)."""
    target.to(dtype=next(source.parameters()).dtype)
    target.load_state_dict(source.state_dict(), strict=True)


def apply_reference_lora(
    llava: LlavaForConditionalGeneration | LlavaNextForConditionalGeneration,
    rank: int,
    alpha: int,
    dropout: float,
    targets: str,
) -> PeftModel:
    """LoRA on the language model's `targets` (`reference_lora_targets`); the projector (and
    LLaVA-NeXT's image_newline) trains in full.

    Everything else (vision tower, embeddings, norms, lm_head) is frozen. peft's LoRA weights
    start with B = 0, so the wrapped model computes exactly what `llava` did.
    """
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    peft_model = get_peft_model(llava, lora)
    # requires_grad rather than modules_to_save: no second copy of the projector, and the same
    # parameter tensors stay reachable as `...multi_modal_projector.linear_1.weight`.
    for param in trainable_image_path(llava):
        param.requires_grad_(True)
    return peft_model


def reference_projector(model: nn.Module) -> nn.Module:
    """The LLaVA projector inside a reference model, peft-wrapped or not."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model.multi_modal_projector
