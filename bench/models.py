"""Model builders of the benchmark: random weights at a preset's sizes (bench/presets.py).

`build_ours` builds the VLM
in memory exactly as `model/builder.py` composes a loaded one (tower in the LLM's dtype, fp32
projector), with no download and no checkpoint on disk; it also works on the `meta` device,
which is how the tests check the real sizes. `prepare_models` then builds the reference from the
same weights and applies the training mode to both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from torch import nn

from bench.flops import LanguageDims, VisionDims
from bench.presets import ScalePreset
from bench.reference_llava import (
    apply_reference_lora,
    build_reference_llava,
    copy_weights,
    reference_lora_targets,
    trainable_image_path,
)
from model.builder import compose_vlm, load_language_model
from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
from model.trainable import configure_trainable
from model.vlm import VisionLanguageModel
from qwen import IMAGE_TOKEN, QWenConfig, QWenLMHeadModel, QWenTokenizer
from visual.hf_tower import HFVisionTower, default_preprocessor, vision_model_class
from visual.preprocessing import ASPECT_RATIOS
from visual.tower import resolve_feature_layer

logger = logging.getLogger(__name__)

MODES = ("lora", "qlora", "projector")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (a 7B model never exists in fp32 first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def vision_config(preset: ScalePreset):
    if preset.vision_type == "clip_vision_model":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**preset.vision)
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**preset.vision)


def build_ours(
    preset: ScalePreset,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    image_aspect_ratio: str = "pad",
    image_grid_pinpoints: list[list[int]] | None = None,
) -> VisionLanguageModel:
    """Random-weight VLM: QWen (or Qwen2) + CLIP/SigLIP (feature layer -2) in `dtype`, fp32
    projector. A Qwen2 LLM uses Qwen's tokenizer and `<|extra_0|>` as the image token.
    `image_aspect_ratio` "anyres": the AnyRes projector tiling `image_grid_pinpoints` (None:
    training's default), composed by `model.builder` as training composes it."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"--image_aspect_ratio {image_aspect_ratio!r}: one of {ASPECT_RATIOS}")
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        llm = build_llm(preset)
        tower_config = vision_config(preset)
        tower_model = vision_model_class(tower_config.model_type)(tower_config)
    llm.config.use_cache = False
    preprocessor = default_preprocessor(tower_config, image_aspect_ratio)
    settings = {
        "library": "transformers",
        "feature_layer": -2,
        "image_aspect_ratio": image_aspect_ratio,
    }
    vision = HFVisionTower(tower_model, preprocessor, feature_layer=-2, settings=settings)
    image_token = None if preset.qwen2 is None else IMAGE_TOKEN
    tiling = VisionConfig(image_grid_pinpoints=image_grid_pinpoints)
    with torch.device(device):
        return compose_vlm(
            llm, QWenTokenizer(), vision, ProjectorConfig("mlp2x_gelu"), image_token, tiling
        )


def build_llm(preset: ScalePreset) -> nn.Module:
    if preset.qwen2 is None:
        return QWenLMHeadModel(QWenConfig(**preset.qwen))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**preset.qwen2))


def model_dims(vlm: VisionLanguageModel) -> tuple[VisionDims, LanguageDims]:
    """The sizes bench.flops needs, read from the built model's configs."""
    tower = vlm.vision.model.config
    feature_index = resolve_feature_layer(vlm.vision.feature_layer, tower.num_hidden_layers)
    vision = VisionDims(
        hidden_size=tower.hidden_size,
        intermediate_size=tower.intermediate_size,
        layers_used=tower.num_hidden_layers + 1 + feature_index,
        patch_size=tower.patch_size,
        image_tokens=vlm.vision.num_image_tokens,
        class_token=vlm.vision.drop_class_token,
    )
    return vision, language_dims(vlm.llm.config)


def language_dims(config) -> LanguageDims:
    """A QWen or Qwen2 config's sizes (QWen's intermediate_size is twice its MLP width)."""
    native = config.model_type == "qwen"
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    return LanguageDims(
        hidden_size=config.hidden_size,
        mlp_width=config.intermediate_size // 2 if native else config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        kv_size=None if native else config.hidden_size // heads * (kv_heads or heads),
    )


def adapted_linears(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear that carries a LoRA adapter (peft's `lora_A`)."""
    return [
        (module.in_features, module.out_features)
        for module in model.modules()
        if hasattr(module, "lora_A") and hasattr(module, "in_features")
    ]


def add_gradient_checkpointing_flag(parser: argparse.ArgumentParser) -> None:
    """`--gradient-checkpointing` / `--no-gradient-checkpointing` (default off), for both sides."""
    parser.add_argument(
        "--gradient-checkpointing",
        "--gradient_checkpointing",
        dest="gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
    )


def prepare_models(
    preset: ScalePreset,
    *,
    mode: str,
    impls: list[str],
    device: str | torch.device,
    dtype: torch.dtype,
    lora: LoraSettings,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    image_aspect_ratio: str = "pad",
    image_grid_pinpoints: list[list[int]] | None = None,
) -> tuple[dict[str, nn.Module], VisionLanguageModel]:
    """Models ready to train, keyed by impl, on identical weights; and our VLM (for its sizes).

    `mode`: lora (LoRA on the LLM + projector), qlora (the same on a 4-bit NF4 base), projector
    (stage 1: the projector alone). `lora.train_mode` is set from `mode`. `image_aspect_ratio`
    anyres: ours with the AnyRes projector, the reference a LLaVA-NeXT (`build_ours`).
    """
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    vlm = build_ours(
        preset,
        device=device,
        dtype=dtype,
        seed=seed,
        image_aspect_ratio=image_aspect_ratio,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    vlm.train()
    reference = build_reference_llava(vlm) if "reference" in impls else None
    if mode == "qlora":
        reference = quantize_models(vlm, reference, dtype, device)
    settings = replace(lora, train_mode="projector" if mode == "projector" else "projector+lora")
    torch.manual_seed(seed)  # the same LoRA A init in every run
    configure_trainable(
        vlm, settings, quantized=mode == "qlora", gradient_checkpointing=gradient_checkpointing
    )
    models: dict[str, nn.Module] = {"ours": vlm} if "ours" in impls else {}
    if reference is not None:
        models["reference"] = configure_reference(
            reference, mode, settings, gradient_checkpointing, vlm, seed
        )
    return models, vlm


def configure_reference(
    llava: nn.Module,
    mode: str,
    settings: LoraSettings,
    gradient_checkpointing: bool,
    vlm: VisionLanguageModel,
    seed: int = 0,
) -> nn.Module:
    """The reference's counterpart of model/trainable.py::configure_trainable (`vlm`: ours)."""
    if mode == "qlora":
        llava = prepare_model_for_kbit_training(
            llava,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # prepare_model_for_kbit_training upcasts every non-4-bit weight to fp32; ours applies it
        # to the LLM only, so the tower goes back to the run's dtype.
        llava.model.vision_tower.to(vlm.vision.dtype)
    elif gradient_checkpointing:
        llava.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    llava.train()
    llava.model.vision_tower.eval()
    if mode == "projector":
        llava.requires_grad_(False)
        for param in trainable_image_path(llava):
            param.requires_grad_(True)
        return llava
    torch.manual_seed(seed)
    targets = reference_lora_targets(settings.target_modules, native=vlm.native_splice)
    return apply_reference_lora(
        llava, settings.lora_rank, settings.lora_alpha, settings.lora_dropout, targets
    )


def quantize_models(
    vlm: VisionLanguageModel,
    reference: nn.Module | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> nn.Module | None:
    """Swap both LLMs for 4-bit NF4 copies of their weights (through a temporary checkpoint,
    the way QLoRA loads); towers and projectors keep their exact weights and dtypes."""
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    dtype_name = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        qwen_dir = Path(tmp) / "qwen"
        vlm.llm.save_pretrained(qwen_dir)
        QWenTokenizer().save_pretrained(qwen_dir)
        config = LanguageModelConfig(language_model=str(qwen_dir), dtype=dtype_name, bits=4)
        vlm.llm = load_language_model(config)[0]
        if reference is None:
            return None
        reference.save_pretrained(Path(tmp) / "llava")
        del reference
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )
        reference = LlavaForConditionalGeneration.from_pretrained(
            Path(tmp) / "llava",
            quantization_config=quantization,
            dtype=dtype,
            device_map={"": str(device)},
        )
    # from_pretrained loaded the fp32 projector in `dtype`: restore our exact weights.
    copy_weights(vlm.projector, reference.model.multi_modal_projector)
    return reference
