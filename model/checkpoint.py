"""Small, self-describing checkpoints: only what trained, plus what is needed to rebuild the rest.

A checkpoint directory holds
- `vlm_config.json`: base model paths (absolute where they were local directories), vision
  settings (feature layer, aspect ratio), projector kind, `image_token_id`, tokens per image, a
  fingerprint of the frozen base weights, and which weight files are present;
- `projector.safetensors`;
- `adapter/` (peft LoRA, safetensors) when LoRA trained, or `language_model/` (a full
  `save_pretrained` directory in the original checkpoint layout) when the LLM trained fully or
  the adapter was merged;
- the tokenizer files and, for training runs, `train_config.yaml`.
A run started from a trained model (`train.py --init_from DIR`) trains a fresh LoRA on that
model with its own LoRA merged, which exists only in memory: its `vlm_config.json` records the
parent (`init_from`: path and content fingerprint) and loading rebuilds the parent, merges it,
then applies the child's weights; a parent changed since is refused.
Frozen weights (vision tower, base LLM) are never copied. A damaged file, a shape that does not fit
the rebuilt model, or base weights other than the ones trained on raise `CheckpointError` naming
the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from identity.fingerprint import module_fingerprint, path_fingerprint
from model.base_check import (  # noqa: F401 - CheckpointError and VLM_CONFIG are this module's API
    VLM_CONFIG,
    CheckpointError,
    check_base,
    check_not_merged_base,
)
from model.builder import compose_vlm, load_language_model, load_vision
from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig, resolve_dtype
from model.peft_wrapping import quiet_peft_wrapping
from model.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LLM_DIR = "language_model"
FORMAT = "qwen-vlm-checkpoint/1"
INIT_FROM = "init_from"  # vlm_config.json: the trained model this one was trained on top of


def _resolved(path: str | None) -> str | None:
    """A local path made absolute (so the checkpoint loads from any cwd); hub ids unchanged."""
    if path is not None and Path(path).exists():
        return str(Path(path).resolve())
    return path


def describe(
    vlm: VisionLanguageModel,
    language: LanguageModelConfig,
    vision: VisionConfig,
    projector: ProjectorConfig,
    *,
    system_prompt: str,
    weights: list[str] = (),
) -> dict:
    """The checkpoint's `vlm_config.json`; call it before training changes any weight."""
    language = dataclasses.replace(language, language_model=_resolved(language.language_model))
    vision = dataclasses.replace(vision, vision_model=_resolved(vision.vision_model))
    projector = dataclasses.replace(projector, projector_path=_resolved(projector.projector_path))
    return {
        "format": FORMAT,
        "system_prompt": system_prompt,
        "language_model": dataclasses.asdict(language),
        "vision": dataclasses.asdict(vision),
        "projector": dataclasses.asdict(projector),
        "image_token_id": vlm.image_token_id,
        "num_image_tokens": vlm.num_image_tokens,
        "vision_hidden_size": vlm.vision.hidden_size,
        "llm_hidden_size": vlm.llm.config.hidden_size,
        "base_fingerprint": {
            "language_model": module_fingerprint(vlm.llm),
            "vision": module_fingerprint(vlm.vision),
        },
        "weights": list(weights),
    }


def save_description(description: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / VLM_CONFIG).write_text(json.dumps(description, indent=2), encoding="utf-8")


def save_projector_weights(
    vlm: VisionLanguageModel, out: Path, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    state = _with_gathered(vlm.projector.state_dict(), gathered, "projector.")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / PROJECTOR_FILE)


def _with_gathered(state: dict, gathered: dict | None, prefix: str) -> dict:
    """A module's own state with the gathered tensors of its parameters (`prefix` + name) in
    place of its local ones, which ZeRO-3 or FSDP holds only a shard of."""
    if gathered is None:
        return state
    return {k: gathered.get(prefix + k, v) for k, v in state.items()}


def save_trainable(
    vlm: VisionLanguageModel,
    tokenizer,
    out_dir: str | Path,
    description: dict,
    gathered: dict[str, torch.Tensor] | None = None,
):
    """Writes the projector, the adapter or full LLM if they trained, the tokenizer and config.

    `gathered`: {VLM parameter name: whole tensor} for every trainable parameter, where an engine
    shards them (runtime/engines.py); the files are the same as a single process writes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_projector_weights(vlm, out, gathered)
    weights = [PROJECTOR_FILE]
    from peft import PeftModel  # imported where used: it imports bitsandbytes (runtime/cli.py)

    adapter = isinstance(vlm.llm, PeftModel)
    if adapter or any(p.requires_grad for p in vlm.llm.parameters()):
        folder = ADAPTER_DIR if adapter else LLM_DIR
        state = None if gathered is None else _with_gathered(vlm.llm.state_dict(), gathered, "llm.")
        vlm.llm.save_pretrained(out / folder, state_dict=state)
        weights.append(folder)
    tokenizer.save_pretrained(out)
    save_description({**description, "weights": weights}, out)
    readable_weights(out)


def readable_weights(directory: Path) -> None:
    """safetensors writes its files 0600; give them the mode any other file gets here (0644 under
    the usual umask), so the people a checkpoint is shared with can read it."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in directory.rglob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def read_description(checkpoint: str | Path) -> dict:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    path = checkpoint / VLM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint of this toolkit (no {VLM_CONFIG})")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: damaged ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} description")
    return description


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """`load_file` with the damaged-file case named (truncated downloads, interrupted copies)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({error})") from None


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """`load_state_dict` whose shape mismatch names the file (another rank, another width)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        detail = str(error).split("\n", 1)[-1].strip()
        raise CheckpointError(f"{path}: does not fit this model: {detail}") from None


def load_projector_weights(vlm: VisionLanguageModel, checkpoint: str | Path) -> None:
    path = Path(checkpoint) / PROJECTOR_FILE
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"{checkpoint}: no such directory (expected {PROJECTOR_FILE} in it)"
        )
    load_state(vlm.projector, read_safetensors(path), path)


def load_adapter(llm: nn.Module, adapter_dir: Path) -> nn.Module:
    """The base LLM wrapped with the trained LoRA adapter (a `PeftModel`), or CheckpointError
    naming the file."""
    from peft import PeftModel

    read_safetensors(adapter_dir / ADAPTER_FILE)  # names a damaged file before peft reads it
    config = adapter_dir / ADAPTER_CONFIG
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config}: damaged ({error})") from None
    try:
        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(llm, adapter_dir)
    except (RuntimeError, ValueError, OSError) as error:
        detail = str(error).split("\n", 1)[-1].strip()
        raise CheckpointError(f"{adapter_dir}: does not fit the base LLM: {detail}") from None


def checkpoint_sources(
    checkpoint: str | Path, language_model: str | None = None, vision_model: str | None = None
) -> dict[str, str | None]:
    """Every local path loading `checkpoint` reads: itself and its bases (recorded, or the
    overrides); a command writing an output must not replace any of them."""
    description = read_description(checkpoint)
    return {
        "the checkpoint": str(checkpoint),
        "the base language model": language_model
        or description["language_model"].get("language_model"),
        "the vision tower": vision_model or description["vision"].get("vision_model"),
    }


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """The content fingerprint of a checkpoint's model: its description (which holds the base
    weights' fingerprints) and trained weights - not its optimizer or checkpoint-N/ folders.
    Weight files over 64 MiB are sampled (a retrained model changes every block)."""
    checkpoint = Path(checkpoint)
    parts = [VLM_CONFIG, PROJECTOR_FILE, ADAPTER_DIR, LLM_DIR]
    digests = [
        f"{name}:{path_fingerprint(checkpoint / name, sample_over=1 << 26)}"
        for name in parts
        if (checkpoint / name).exists()
    ]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def load_vlm(
    checkpoint: str | Path,
    *,
    language_model: str | None = None,
    vision_model: str | None = None,
    dtype: str = "auto",
    bits: int = 16,
    allow_other_base: bool = False,
):
    """Rebuilds a trained VLM. Returns (vlm, tokenizer, description).

    `language_model` / `vision_model` override the base paths recorded at training time (a
    checkpoint trained on one machine, loaded on another). A checkpoint whose LLM was merged or
    fully trained carries its own `language_model/` directory and ignores the override. Base
    weights whose fingerprint differs from the recorded one are refused unless `allow_other_base`.
    """
    checkpoint = Path(checkpoint)
    description = read_description(checkpoint)
    own_llm = LLM_DIR in description["weights"]
    overrides = {"language_model": language_model, "vision_model": vision_model}
    if INIT_FROM in description and not own_llm:
        from model.lineage import load_parent  # it loads through this module

        vlm, tokenizer = load_parent(
            checkpoint, description, dtype, bits, allow_other_base, overrides
        )
    else:
        vlm, tokenizer = _load_base(
            checkpoint, description, dtype, bits, allow_other_base, overrides
        )
    weights = description["weights"]
    check_base(description, vlm, llm=not own_llm, allow_other=allow_other_base)
    load_projector_weights(vlm, checkpoint)
    if ADAPTER_DIR in weights:
        vlm.llm = load_adapter(vlm.llm, checkpoint / ADAPTER_DIR)
    if vlm.num_image_tokens != description["num_image_tokens"]:
        raise CheckpointError(
            f"{checkpoint}: trained with {description['num_image_tokens']} tokens per image, "
            f"the rebuilt vision tower + projector give {vlm.num_image_tokens}"
        )
    vlm.eval()
    return vlm, tokenizer, description


def _load_base(checkpoint: Path, description: dict, dtype, bits, allow_other_base, overrides):
    """(vlm, tokenizer) of the bases `description` names (or the checkpoint's own full LLM)."""
    language = LanguageModelConfig(**description["language_model"])
    language.dtype, language.bits = dtype, bits
    own_llm = LLM_DIR in description["weights"]
    if ADAPTER_DIR in description["weights"] and not allow_other_base:
        check_not_merged_base(overrides["language_model"], checkpoint)
    llm_path = str(checkpoint / LLM_DIR) if own_llm else overrides["language_model"]
    llm, tokenizer = load_language_model(language, path=llm_path)
    vision_config = VisionConfig(**description["vision"])
    vision = load_vision(vision_config, resolve_dtype(dtype), path=overrides["vision_model"])
    projector_config = ProjectorConfig(**description["projector"])
    vlm = compose_vlm(
        llm, tokenizer, vision, projector_config, language.image_token, tiling=vision_config
    )
    if vlm.image_token_id != description["image_token_id"]:
        raise CheckpointError(
            f"{checkpoint}: trained with image_token_id {description['image_token_id']}, "
            f"but the language model's tokenizer gives {vlm.image_token_id}"
        )
    return vlm, tokenizer
