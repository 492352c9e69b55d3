"""Small, self-describing checkpoints: only what trained, plus what is needed to rebuild the rest.

A checkpoint directory holds
- `vlm_config.json`: base model paths, vision settings (feature layer, aspect ratio),
  projector kind, `image_token_id`, tokens per image, and which weight files are present;
- `projector.safetensors`;
- `adapter/` (peft LoRA, safetensors) when LoRA trained, or `language_model/` (a full
  `save_pretrained` directory in the original checkpoint layout) when the LLM trained fully or
  the adapter was merged;
- the tokenizer files and, for training runs, `train_config.yaml`.
Frozen weights (vision tower, base LLM) are never copied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from model.builder import load_language_model, load_vision, make_projector, resolve_dtype
from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig
from model.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

VLM_CONFIG = "vlm_config.json"
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
LLM_DIR = "language_model"


def describe(
    vlm: VisionLanguageModel,
    language: LanguageModelConfig,
    vision: VisionConfig,
    projector: ProjectorConfig,
    *,
    system_prompt: str,
    weights: list[str] = (),
) -> dict:
    return {
        "format": "qwen-vlm-checkpoint/1",
        "system_prompt": system_prompt,
        "language_model": dataclasses.asdict(language),
        "vision": dataclasses.asdict(vision),
        "projector": dataclasses.asdict(projector),
        "image_token_id": vlm.image_token_id,
        "num_image_tokens": vlm.num_image_tokens,
        "vision_hidden_size": vlm.vision.hidden_size,
        "llm_hidden_size": vlm.llm.config.hidden_size,
        "weights": list(weights),
    }


def save_projector_weights(vlm: VisionLanguageModel, out: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in vlm.projector.state_dict().items()}
    save_file(state, out / PROJECTOR_FILE)


def save_trainable(vlm: VisionLanguageModel, tokenizer, out_dir: str | Path, description: dict):
    """Writes the projector, the adapter or full LLM if they trained, the tokenizer and config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_projector_weights(vlm, out)
    weights = [PROJECTOR_FILE]
    if isinstance(vlm.llm, PeftModel):
        vlm.llm.save_pretrained(out / ADAPTER_DIR)
        weights.append(ADAPTER_DIR)
    elif any(p.requires_grad for p in vlm.llm.parameters()):
        vlm.llm.save_pretrained(out / LLM_DIR)
        weights.append(LLM_DIR)
    tokenizer.save_pretrained(out)
    description = {**description, "weights": weights}
    (out / VLM_CONFIG).write_text(json.dumps(description, indent=2), encoding="utf-8")


def read_description(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / VLM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint of this toolkit (no {VLM_CONFIG})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_projector_weights(vlm: VisionLanguageModel, checkpoint: str | Path) -> None:
    path = Path(checkpoint) / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --projector_path must be a training output dir")
    vlm.projector.load_state_dict(load_file(path))


def load_vlm(
    checkpoint: str | Path,
    *,
    language_model: str | None = None,
    vision_model: str | None = None,
    dtype: str = "auto",
    bits: int = 16,
):
    """Rebuilds a trained VLM. Returns (vlm, tokenizer, description).

    `language_model` / `vision_model` override the base paths recorded at training time (a
    checkpoint trained on one machine, loaded on another). A checkpoint whose LLM was merged or
    fully trained carries its own `language_model/` directory and ignores the override.
    """
    checkpoint = Path(checkpoint)
    description = read_description(checkpoint)
    language = LanguageModelConfig(**description["language_model"])
    language.dtype, language.bits = dtype, bits
    weights = description["weights"]
    llm_path = str(checkpoint / LLM_DIR) if LLM_DIR in weights else language_model
    llm, tokenizer, image_token_id = load_language_model(language, path=llm_path)
    if image_token_id != description["image_token_id"]:
        raise ValueError(
            f"{checkpoint}: trained with image_token_id {description['image_token_id']}, "
            f"but the language model's tokenizer gives {image_token_id}"
        )
    vision_config = VisionConfig(**description["vision"])
    vision = load_vision(vision_config, resolve_dtype(dtype), path=vision_model)
    projector = make_projector(ProjectorConfig(**description["projector"]), vision, llm)
    vlm = VisionLanguageModel(vision, projector, llm, image_token_id)
    load_projector_weights(vlm, checkpoint)
    if ADAPTER_DIR in weights:
        vlm.llm = PeftModel.from_pretrained(llm, checkpoint / ADAPTER_DIR)
    if vlm.num_image_tokens != description["num_image_tokens"]:
        raise ValueError(
            f"{checkpoint}: trained with {description['num_image_tokens']} tokens per image, "
            f"the rebuilt vision tower + projector give {vlm.num_image_tokens}"
        )
    vlm.eval()
    return vlm, tokenizer, description


def merge_checkpoint(checkpoint: str | Path, out_dir: str | Path, **load_kwargs) -> Path:
    """Applies `merge_and_unload` and writes a directory that loads without peft.

    The base LLM is loaded in 16/32-bit even when training used 4-bit QLoRA, so the merged
    weights come from the original checkpoint rather than from dequantized 4-bit ones.
    """
    load_kwargs = {**load_kwargs, "bits": 16}
    vlm, tokenizer, description = load_vlm(checkpoint, **load_kwargs)
    if isinstance(vlm.llm, PeftModel):
        vlm.llm = vlm.llm.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vlm.llm.save_pretrained(out / LLM_DIR)
    tokenizer.save_pretrained(out / LLM_DIR)
    tokenizer.save_pretrained(out)
    save_projector_weights(vlm, out)
    merged = {**description, "weights": [PROJECTOR_FILE, LLM_DIR], "merged_from": str(checkpoint)}
    (out / VLM_CONFIG).write_text(json.dumps(merged, indent=2), encoding="utf-8")
    logger.info("merged %s into %s", checkpoint, out)
    return out


def trainable_state(vlm: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name (for tests and resume checks)."""
    return {n: p.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}
