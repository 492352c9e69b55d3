"""The network's configuration: one dataclass per component (LLM, vision tower, projector, what
trains), and the dtype names.

The run layer (`runtime/config.py`) adds the data and training sections and loads all of them from
one YAML. Choice lists are imported from the modules that own them, never re-spelled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.anyres import check_anyres_projector
from model.projector import PROJECTOR_KINDS
from visual.anyres import MAX_TILES_FLAG, PINPOINTS_FLAG, check_pinpoints
from visual.loading import LIBRARIES
from visual.preprocessing import ASPECT_RATIOS, default_aspect_ratio

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)
BITS = (16, 4)
TRAIN_MODES = ("projector", "projector+lora", "projector+llm")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that has it, else fp32 (CPU training in bf16 is slow)."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    check_choice("dtype", name, DTYPE_NAMES)
    return DTYPES[name]


def check_choice(flag: str, value, allowed) -> None:
    """Raise the one error message for a value outside its choice list, naming the flag."""
    if value not in allowed:
        raise ValueError(f"--{flag} {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class LanguageModelConfig:
    language_model: str = "demo_assets/tiny-qwen"  # local dir or hub id
    image_token: str | None = None  # placeholder token; None = the Qwen-7B tokenizer's own
    dtype: str = "auto"  # one of DTYPE_NAMES
    bits: int = 16  # 16, or 4 for QLoRA (NF4)


@dataclass
class VisionConfig:
    vision_model: str = "demo_assets/tiny-clip"  # local dir, hub id, or open_clip model name
    vision_library: str = "transformers"  # one of visual.loading.LIBRARIES
    vision_pretrained: str | None = None  # open_clip pretrained tag or weights file
    vision_feature_layer: int = -2
    # one of visual.preprocessing.ASPECT_RATIOS; None: the tower library's own (resolve_defaults)
    image_aspect_ratio: str | None = None
    # anyres only: [[height, width], ...] in pixels, multiples of the tower's image size; None:
    # LLaVA-NeXT's five layouts scaled to the tower (visual.anyres.default_pinpoints)
    image_grid_pinpoints: list[list[int]] | None = None
    # anyres only: drop the pinpoints of more tiles than this (caps an image's tokens)
    image_max_tiles: int | None = None


@dataclass
class ProjectorConfig:
    projector_type: str = "mlp2x_gelu"  # one of model.projector.PROJECTOR_KINDS
    num_queries: int = 256  # resampler only
    projector_path: str | None = None  # start from a trained projector (e.g. stage 1's output dir)


@dataclass
class LoraSettings:
    train_mode: str = "projector+lora"  # one of TRAIN_MODES
    lora_rank: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = "c_attn|w1|w2"  # module names inside the LLM, "|"-separated
    # LLM modules trained in full next to LoRA, "|"-separated (peft `modules_to_save`), e.g.
    # "ln_f" or "wte|lm_head" (Qwen's recipe for base models, whose ChatML tokens are untrained)
    modules_to_save: str | None = None


def resolve_defaults(vision: VisionConfig) -> None:
    """Fill what the tower owns when no flag or YAML key gave it: `image_aspect_ratio` from the
    tower library (`visual.preprocessing.default_aspect_ratio`), so the saved config is concrete."""
    if vision.image_aspect_ratio is None:
        vision.image_aspect_ratio = default_aspect_ratio(vision.vision_library)


def validate_model_config(
    language: LanguageModelConfig,
    vision: VisionConfig,
    projector: ProjectorConfig,
    lora: LoraSettings,
) -> None:
    """Reject values that would otherwise fail after the weights load, naming the flag."""
    check_choice("train_mode", lora.train_mode, TRAIN_MODES)
    check_choice("vision_library", vision.vision_library, LIBRARIES)
    if vision.image_aspect_ratio is not None:  # None: the tower's own (`resolve_defaults`)
        check_choice("image_aspect_ratio", vision.image_aspect_ratio, ASPECT_RATIOS)
    check_choice("projector_type", projector.projector_type, PROJECTOR_KINDS)
    check_anyres_settings(vision, projector)
    check_choice("dtype", language.dtype, DTYPE_NAMES)
    check_choice("bits", language.bits, BITS)
    if language.bits == 4 and lora.train_mode == "projector+llm":
        raise ValueError(
            "--bits 4 (QLoRA) cannot train the full LLM; use --train_mode projector+lora"
        )


def check_anyres_settings(vision: VisionConfig, projector: ProjectorConfig) -> None:
    """The AnyRes flags: only with `--image_aspect_ratio anyres`, well-formed, and a tower and
    projector that can tile. Multiples of the tower's size are checked when it loads."""
    if vision.image_aspect_ratio != "anyres":
        for flag, value in (
            (PINPOINTS_FLAG, vision.image_grid_pinpoints),
            (MAX_TILES_FLAG, vision.image_max_tiles),
        ):
            if value is not None:
                raise ValueError(f"{flag} applies to --image_aspect_ratio anyres only")
        return
    if vision.vision_library == "qwen_vl":
        raise ValueError(
            "--image_aspect_ratio anyres cannot use --vision_library qwen_vl: its resampled "
            "queries are not a patch grid to lay tiles out on"
        )
    check_anyres_projector(projector.projector_type)
    if vision.image_grid_pinpoints is not None:
        check_pinpoints(vision.image_grid_pinpoints, 1)
    tiles = vision.image_max_tiles
    if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
        raise ValueError(f"{MAX_TILES_FLAG} {tiles!r}: expected a positive integer")
