"""Resuming a training run: exactly, or refused with the reason; never silently something else.

An exact resume needs everything the interrupted run had in memory: the trainable weights, the
optimizer's moments (`optimizer.pt`), the learning-rate schedule (`scheduler.pt`), the random state
of each process (`rng_state.pth`, or `rng_state_<rank>.pth` under torchrun) and the step and data
position (`trainer_state.json`), and the settings it trained with (`train_config.yaml`). Without
one of them the Trainer would go on anyway, with another learning rate and other losses, so
`check_resume` refuses, naming the file, before any model is loaded. `--resume_weights_only` is the
explicit way out: it loads the trainable weights only and starts a new run at step 0.

Damaged files raise `CheckpointError` naming the file: torch archives are read through (their CRCs
catch flipped bytes that `torch.load` would accept), safetensors and JSON are parsed.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from transformers.trainer_utils import get_last_checkpoint

from identity.fingerprint import path_fingerprint
from model.checkpoint import (
    ADAPTER_DIR,
    ADAPTER_FILE,
    LLM_DIR,
    PROJECTOR_FILE,
    VLM_CONFIG,
    CheckpointError,
    check_base,
    load_projector_weights,
    load_state,
    read_description,
    read_safetensors,
)
from model.vlm import VisionLanguageModel
from runtime.config import DataConfig, RunConfig, TrainingConfig

logger = logging.getLogger(__name__)

TRAIN_CONFIG = "train_config.yaml"
TRAINING_DATA = "training_data"  # vlm_config.json's record of the data file trained on
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
FSDP_OPTIMIZER_FILE = "optimizer.bin"  # accelerate's name, FULL_STATE_DICT
# Settings that shape the network or decide what trains: weights saved under other values do not
# fit, or mean something else (another lora_alpha scales the same weights differently)
NETWORK_FIELDS = (
    "train_mode",
    "lora_rank",
    "lora_alpha",
    "target_modules",
    "modules_to_save",
    "projector_type",
    "num_queries",
    "vision_feature_layer",
    "image_token",
)
# Settings an exact resume must keep: the restored optimizer would silently ignore new learning
# rates, and the skipped steps would stand for other samples under another batch or data order
EXACT_FIELDS = (
    "bits",
    "lora_dropout",
    "learning_rate",
    "feature_proj_lr",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "model_max_length",
    "system_prompt",
    "image_aspect_ratio",
    "image_grid_pinpoints",  # the tiles, so the tokens, of every image
    "image_max_tiles",
    "group_by_length",
    "packing",
    "deepspeed",  # each engine keeps its optimizer in its own format
    "fsdp",
)
_LOST_WITHOUT = {
    TRAINER_STATE: "the step count and data position",
    OPTIMIZER_FILE: "the optimizer's moments",
    FSDP_OPTIMIZER_FILE: "the optimizer's moments",
    SCHEDULER_FILE: "the learning-rate schedule",
}
_RNG_LOST = "this process's random state (one file per process: resume with as many processes)"
WEIGHTS_ONLY_HINT = (
    "--resume_weights_only to start a new run from its weights (in a new --output_dir)"
)
TORCH_LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile)


def resolve_resume(training: TrainingConfig) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (`latest`: the newest in output_dir, or
    None when there is none yet), or None when the run starts fresh."""
    resume = training.resume_from_checkpoint
    if resume is None:
        if training.resume_weights_only:
            raise ValueError("--resume_weights_only needs --resume_from_checkpoint (a checkpoint)")
        return None
    if resume == "latest":
        out = Path(training.output_dir)
        found = get_last_checkpoint(str(out)) if out.is_dir() else None
        if found is None:
            logger.info("no checkpoint in %s yet: starting fresh", out)
        return found
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such directory")
    return resume


def rng_state_file(checkpoint: str | Path, world_size: int, rank: int) -> Path:
    """The Trainer's name for one process's random state."""
    name = f"rng_state_{rank}.pth" if world_size > 1 else "rng_state.pth"
    return Path(checkpoint) / name


def check_resume(config: RunConfig, checkpoint: str | Path, *, world_size: int = 1, rank: int = 0):
    """Before any model loads: the checkpoint has every file this resume needs, undamaged, and
    was trained with this run's settings. Raises ValueError / CheckpointError naming the file."""
    checkpoint = Path(checkpoint)
    exact = not config.training.resume_weights_only
    check_same_settings(config, checkpoint, exact=exact)
    _check_weight_files(checkpoint, config.lora.train_mode)
    if not exact:
        return
    check_same_data(config.data, checkpoint)
    state = checkpoint / TRAINER_STATE
    archives = [
        checkpoint / SCHEDULER_FILE,
        *_optimizer_files(config.training, checkpoint),
        rng_state_file(checkpoint, world_size, rank),
    ]
    for path in (state, *archives):
        if not path.is_file():
            lost = _LOST_WITHOUT.get(path.name, _RNG_LOST)
            raise CheckpointError(
                f"{path}: missing, so resuming {checkpoint} would not be exact ({lost} would "
                f"start fresh); pass {WEIGHTS_ONLY_HINT}"
            )
    _check_trainer_state(state)
    for path in archives:
        check_torch_file(path)


def _optimizer_files(training: TrainingConfig, checkpoint: Path) -> list[Path]:
    """Where each engine keeps the optimizer (`runtime/trainer.py` writes them): DeepSpeed in the
    folder its `latest` file names (checked here, its files are DeepSpeed's to read), FSDP in
    `optimizer.bin`, the rest in `optimizer.pt`."""
    if training.fsdp is not None:
        return [checkpoint / FSDP_OPTIMIZER_FILE]
    if training.deepspeed is None:
        return [checkpoint / OPTIMIZER_FILE]
    latest = checkpoint / "latest"
    tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    if not tag or not (checkpoint / tag).is_dir():
        raise CheckpointError(
            f"{latest}: missing, or names no folder of DeepSpeed's optimizer state, so resuming "
            f"{checkpoint} would not be exact; pass {WEIGHTS_ONLY_HINT}"
        )
    return []


def check_same_settings(config: RunConfig, checkpoint: Path, *, exact: bool) -> None:
    """Refuse settings that differ from the checkpoint's `train_config.yaml`, naming each flag."""
    path = checkpoint / TRAIN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; cannot tell which settings {checkpoint} had")
    try:
        saved_sections = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: damaged ({type(error).__name__})") from None
    if not isinstance(saved_sections, dict):
        raise CheckpointError(f"{path}: damaged (not a mapping of sections)")
    saved, current = _flat(saved_sections), _flat(config.to_dict())
    names = NETWORK_FIELDS + (EXACT_FIELDS if exact else ())
    changed = [n for n in names if n in saved and saved[n] != current[n]]
    if not changed:
        return
    diffs = "; ".join(f"--{n} is {current[n]!r} here, {saved[n]!r} there" for n in changed)
    way_out = "pass the checkpoint's values"
    if not set(changed) & set(NETWORK_FIELDS):
        way_out += f", or {WEIGHTS_ONLY_HINT}"
    raise ValueError(
        f"resuming {checkpoint} with other settings than its {path.name}: {diffs}; {way_out}"
    )


def data_identity(data: DataConfig) -> dict:
    """The training data as a run records it: its path and its content fingerprint (which also
    covers the record order, the order an exact resume skips samples in)."""
    path = Path(data.data_path)
    fingerprint = path_fingerprint(path) if path.is_file() else None
    return {"data_path": str(path.resolve()), "fingerprint": fingerprint}


def check_same_data(data: DataConfig, checkpoint: Path) -> None:
    """An exact resume skips the samples already trained on by position: in another or an edited
    data file those positions hold other samples. Refused, naming both files."""
    description = checkpoint / VLM_CONFIG
    recorded = read_description(checkpoint).get(TRAINING_DATA) if description.is_file() else None
    if recorded is None:
        logger.warning("%s records no training data fingerprint (an older run): cannot check "
                       "that --data_path %s is the data it trained on", checkpoint, data.data_path)  # fmt: skip
        return
    current = data_identity(data)
    if current["fingerprint"] == recorded["fingerprint"]:
        return
    raise ValueError(
        f"--data_path {data.data_path}: not the data {checkpoint} trained on ({recorded['data_path']}"
        f", content {recorded['fingerprint']}; this file's is {current['fingerprint']}): an exact "
        f"resume would skip other samples than the ones trained on; pass that data, or "
        f"{WEIGHTS_ONLY_HINT}"
    )


def _flat(sections: dict) -> dict:
    return {k: v for s in sections.values() if isinstance(s, dict) for k, v in s.items()}


def _check_weight_files(checkpoint: Path, train_mode: str) -> None:
    read_safetensors(checkpoint / PROJECTOR_FILE)
    if train_mode == "projector+lora":
        read_safetensors(checkpoint / ADAPTER_DIR / ADAPTER_FILE)
    elif train_mode == "projector+llm" and not (checkpoint / LLM_DIR / "config.json").is_file():
        raise CheckpointError(f"{checkpoint / LLM_DIR}: missing (this run trains the full LLM)")


def _check_trainer_state(path: Path) -> None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: damaged ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{path}: damaged (no global_step)")


def check_torch_file(path: Path) -> None:
    """A `torch.save` archive read through: truncation and flipped bytes name the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: damaged or truncated ({error})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged (checksum mismatch in {bad})")


def load_torch_state(target, path: Path) -> None:
    """`target.load_state_dict(torch.load(path))`, naming a missing, damaged or misfitting file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: damaged or truncated ({first_line(error)})") from None
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: does not fit this run ({first_line(error)})") from None


def first_line(error: Exception) -> str:
    """The first line of an error that names something, and how many more there were."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]  # torch's header names only the module class
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return (lines[0] if lines else type(error).__name__) + more


def load_trainable_state(vlm: VisionLanguageModel, checkpoint: str | Path) -> None:
    """Loads a checkpoint's trainable weights (projector; LoRA adapter or full LLM) into `vlm`,
    after checking that it was trained on the same frozen base weights."""
    checkpoint = Path(checkpoint)
    check_base(
        read_description(checkpoint), vlm, llm=True, allow_other=False, where=f"{checkpoint}: "
    )
    load_projector_weights(vlm, checkpoint)
    if isinstance(vlm.llm, PeftModel):
        _load_adapter_state(vlm.llm, checkpoint / ADAPTER_DIR / ADAPTER_FILE)
    elif any(p.requires_grad for p in vlm.llm.parameters()):
        _load_full_llm(vlm.llm, checkpoint / LLM_DIR)


def _load_adapter_state(llm: PeftModel, path: Path) -> None:
    state = read_safetensors(path)
    try:
        result = set_peft_model_state_dict(llm, state)
    except RuntimeError as error:  # a size mismatch: another rank, another hidden size
        raise CheckpointError(f"{path}: does not fit this model: {first_line(error)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{path}: does not fit this model's adapter (unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]})"
        )


def _load_full_llm(llm: torch.nn.Module, directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: missing (this run trains the full LLM)")
    dtype = next(llm.parameters()).dtype
    try:
        state = type(llm).from_pretrained(directory, dtype=dtype).state_dict()
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{directory}: damaged ({first_line(error)})") from None
    load_state(llm, state, directory)
