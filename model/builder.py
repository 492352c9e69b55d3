"""Builds the VLM from its configuration: LLM + tokenizer, vision tower, projector.

The facts each part owns are read from it, never recomputed here: the placeholder id from the
tokenizer, Dl from `llm.config`, N and Dv from the vision tower.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import qwen  # noqa: F401 - registers model_type "qwen" with the Auto classes
from model.anyres import build_anyres_projector
from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig, resolve_dtype
from model.projector import build_projector
from model.vlm import VisionLanguageModel
from visual import load_vision_tower
from visual.anyres import anyres_geometry

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "qwen":
        return qwen.QWenTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def image_token_id_for(tokenizer, llm_config, image_token: str | None) -> int:
    """The placeholder's id, owned by the tokenizer; it must be a single existing token."""
    if image_token is None:
        if llm_config.model_type != "qwen":
            raise ValueError(
                f"--image_token is required for model_type {llm_config.model_type!r} "
                "(a single special token of its vocabulary, e.g. '<|image_pad|>' for Qwen2.5)"
            )
        image_token = qwen.IMAGE_TOKEN
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(token_id, int) or token_id == unk or token_id >= llm_config.vocab_size:
        raise ValueError(f"--image_token {image_token!r} is not a single token of this tokenizer")
    return token_id


def require_model(path: str, flag: str) -> None:
    """FileNotFoundError naming `flag` for a path that is neither a model directory (with a
    config.json) nor a hub id that can be fetched here (instead of "Repo id must be ...")."""
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{flag} {path}: not a model directory (config.json) and not a hub id that can be "
            f"fetched here ({type(error).__name__})"
        ) from None


def load_language_model(config: LanguageModelConfig, path: str | None = None):
    """Returns (llm, tokenizer)."""
    path = path or config.language_model
    require_model(path, "--language_model")
    dtype = resolve_dtype(config.dtype)
    kwargs: dict = {"dtype": dtype}
    if config.bits == 4:
        # The 4-bit matmuls compute in the run's dtype: bf16 on a GPU ("auto"), fp32 on CPU.
        # bf16 compute also works on CPU (about as fast), but would add bf16 rounding to an fp32 run.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    llm.config.use_cache = False
    return llm, load_tokenizer(path)


def load_vision(config: VisionConfig, dtype: torch.dtype, path: str | None = None):
    path = path or config.vision_model
    is_open_clip_name = config.vision_library == "open_clip" and not any(
        path.startswith(prefix) for prefix in ("local-dir:", "/", ".")
    )
    if not is_open_clip_name and "://" not in path and not Path(path).exists():
        require_model(path, "--vision_model")
    return load_vision_tower(
        path,
        library=config.vision_library,
        pretrained=config.vision_pretrained,
        feature_layer=config.vision_feature_layer,
        image_aspect_ratio=config.image_aspect_ratio,
        dtype=dtype,
    )


def make_projector(
    config: ProjectorConfig, vision, llm, tiling: VisionConfig | None = None
) -> torch.nn.Module:
    """A fresh projector sized from the tower and `llm.config`. An AnyRes tower's projector
    carries the tiling of `tiling`'s pinpoints and tile cap (None: the defaults)."""
    if vision.settings.get("image_aspect_ratio") == "anyres":
        tiling = tiling or VisionConfig()
        geometry = anyres_geometry(vision, tiling.image_grid_pinpoints, tiling.image_max_tiles)
        return build_anyres_projector(
            config.projector_type, vision.hidden_size, llm.config.hidden_size, geometry
        )
    options = {"num_queries": config.num_queries} if config.projector_type == "resampler" else {}
    return build_projector(
        config.projector_type,
        vision_hidden_size=vision.hidden_size,
        llm_hidden_size=llm.config.hidden_size,
        num_patches=vision.num_image_tokens,
        **options,
    )


def compose_vlm(
    llm,
    tokenizer,
    vision,
    projector_config: ProjectorConfig,
    image_token: str | None = None,
    tiling: VisionConfig | None = None,
) -> VisionLanguageModel:
    """The one composition step: placeholder id from the tokenizer, a fresh projector sized from
    the tower and `llm.config` (fp32: its master weights; AnyRes with `tiling`'s pinpoints), the
    three parts in one module; an LLM whose own loss the chunked loss would not reproduce is
    refused (`check_loss_path`)."""
    image_token_id = image_token_id_for(tokenizer, llm.config, image_token)
    if llm.config.model_type == "qwen":
        llm.config.image_token_id = image_token_id
    projector = make_projector(projector_config, vision, llm, tiling)
    vlm = VisionLanguageModel(vision, projector, llm, image_token_id)
    vlm.check_loss_path()
    return vlm


def build_vlm(
    language: LanguageModelConfig, vision_config: VisionConfig, projector_config: ProjectorConfig
):
    """Returns (VisionLanguageModel, tokenizer), loaded from the configured paths."""
    llm, tokenizer = load_language_model(language)
    vision = load_vision(vision_config, resolve_dtype(language.dtype))
    vlm = compose_vlm(
        llm, tokenizer, vision, projector_config, language.image_token, tiling=vision_config
    )
    logger.info(
        "VLM: %s (%d image tokens, Dv=%d) -> %s -> %s (Dl=%d)",
        vision_config.vision_model,
        vision.num_image_tokens,
        vision.hidden_size,
        projector_config.projector_type,
        language.language_model,
        llm.config.hidden_size,
    )
    return vlm, tokenizer
