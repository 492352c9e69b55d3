"""The engines a run can scale out on besides DDP: DeepSpeed ZeRO-2/3 and FSDP2, both driven by
the HF Trainer; what they need from this VLM, checked before a model loads.

- `--deepspeed FILE` (configs/deepspeed/): the `auto` sizes transformers derives from
  `model.config.hidden_size` are filled here from the LLM's config (the VLM wrapper has none).
- `--fsdp FILE` (configs/fsdp/): transformers' `fsdp_config` keys; the wrap unit defaults to the
  LLM's decoder layer (its `_no_split_modules`), so the frozen tower, the projector, the embeddings
  and the head form the root unit that every rank gathers at the start of every forward.
- Under ZeRO-3 every module gathers its weights when it runs, a collective call: a rank whose
  batch has no image would skip the tower's gathers while another rank waits in them. The VLM then
  runs the tower and projector on a blank image at zero weight (`VisionLanguageModel.probe_tower`).
- Checkpoints hold whole tensors whichever engine trained: `gathered_trainable_state` assembles the
  trainable weights on every rank (a collective call), and a resume loads them before the Trainer
  shards the model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

FSDP_VERSION = 2
OFFLOAD_KEYS = ("offload_optimizer", "offload_param")


def read_engine_file(flag: str, path: str) -> dict:
    """The JSON object in `path`, or a ValueError naming the flag, the file and the position."""
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r}: no such file (see configs/{flag[2:]}/)")
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{flag} {path}: not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg})"
        ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"{flag} {path}: must hold a JSON object of settings")
    return settings


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def zero_stage(settings: dict) -> int:
    return int(settings.get("zero_optimization", {}).get("stage", 0))


def check_engines(deepspeed: str | None, fsdp: str | None, *, bits: int | None) -> None:
    """Engine flags this run cannot honour, refused at start with the flag named."""
    if deepspeed is not None and fsdp is not None:
        raise ValueError("--deepspeed and --fsdp: choose one engine, not both")
    if deepspeed is not None:
        _check_deepspeed(deepspeed, bits)
    if fsdp is not None:
        _check_fsdp(fsdp, bits)


def check_engine_device(fsdp: str | None) -> None:
    """FSDP through the Trainer needs GPUs: accelerate 1.15 makes CPU processes MULTI_CPU and then
    ignores the FSDP plugin, so a CPU run would silently be plain DDP."""
    if fsdp is not None and not torch.cuda.is_available():
        raise ValueError(
            f"--fsdp {fsdp}: FSDP needs GPUs (on CPU processes accelerate runs plain DDP and "
            "ignores FSDP); on CPU use --deepspeed configs/deepspeed/zero3.json, or no engine"
        )


def _check_deepspeed(path: str, bits: int | None) -> None:
    settings = read_engine_file("--deepspeed", path)
    if not deepspeed_installed():
        raise ValueError(
            f"--deepspeed {path}: the deepspeed package is not installed; "
            "pip install -r requirements-scale.txt (see README, Scaling out)"
        )
    for section in ("optimizer", "scheduler"):
        if section in settings:
            raise ValueError(
                f"--deepspeed {path}: remove the {section!r} section; this run's own AdamW and "
                "schedule (two learning rates: --learning_rate, --feature_proj_lr) are used"
            )
    stage = settings.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    if stage == 3 and bits == 4:
        raise ValueError(
            f"--deepspeed {path}: ZeRO-3 cannot partition QLoRA's 4-bit weights (--bits 4); "
            "use configs/deepspeed/zero2.json, or --bits 16"
        )
    for key in OFFLOAD_KEYS:
        device = settings.get("zero_optimization", {}).get(key, {}).get("device", "none")
        if device not in ("none", "cpu"):
            raise ValueError(
                f"--deepspeed {path}: zero_optimization.{key}.device {device!r} is not supported "
                "here; use 'cpu' or 'none'"
            )
        if key == "offload_param" and device == "cpu" and stage != 3:
            raise ValueError(f"--deepspeed {path}: offload_param needs ZeRO stage 3")


def _check_fsdp(path: str, bits: int | None) -> None:
    settings = read_engine_file("--fsdp", path)
    version = settings.get("version", FSDP_VERSION)
    if version != FSDP_VERSION:
        raise ValueError(
            f"--fsdp {path}: version {version!r} is not supported; this toolkit runs FSDP2 "
            '("version": 2)'
        )
    kind = settings.get("state_dict_type", "FULL_STATE_DICT")
    if kind != "FULL_STATE_DICT":
        raise ValueError(
            f"--fsdp {path}: state_dict_type {kind!r} is not supported: checkpoints hold whole "
            'trainable weights and a whole optimizer state ("FULL_STATE_DICT")'
        )
    if bits == 4:
        raise ValueError(
            f"--fsdp {path}: FSDP cannot shard QLoRA's 4-bit weights (--bits 4); use "
            "--deepspeed configs/deepspeed/zero2.json or --bits 16"
        )


def deepspeed_settings(path: str, llm: nn.Module) -> dict:
    """The DeepSpeed JSON with the sizes transformers would derive from the model's hidden size
    (its formulas) filled from the LLM's. Offloading the optimizer keeps this run's own AdamW
    (two learning rates) on the CPU instead of DeepSpeed's compiled CPU Adam."""
    settings = read_engine_file("--deepspeed", path)
    zero = settings.setdefault("zero_optimization", {})
    hidden = int(llm.config.hidden_size)
    derived = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in derived.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("offload_optimizer", {}).get("device", "none") == "cpu":
        settings.setdefault("zero_force_ds_cpu_optimizer", False)
    return settings


def fsdp_settings(path: str, llm: nn.Module) -> dict:
    """The FSDP JSON, wrapping each of the LLM's decoder layers unless the file names the unit."""
    settings = read_engine_file("--fsdp", path)
    settings.setdefault("version", FSDP_VERSION)
    settings.setdefault("state_dict_type", "FULL_STATE_DICT")
    if "transformer_layer_cls_to_wrap" not in settings:
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        layers = list(getattr(base, "_no_split_modules", None) or [])
        if not layers:
            raise ValueError(
                f"--fsdp {path}: {type(base).__name__} does not name its decoder layer "
                "(_no_split_modules); set transformer_layer_cls_to_wrap in the file"
            )
        settings["transformer_layer_cls_to_wrap"] = layers
    return settings


def gathered_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU} for every trainable parameter, whether ZeRO-3 partitions it
    or FSDP2 shards it (a DTensor). Every rank must call this: gathering is collective."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().cpu().clone() for name, p in params.items()}
    return {name: _whole(p).detach().cpu().clone() for name, p in params.items()}


def _whole(param: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(param, "full_tensor", None)  # a DTensor (FSDP2)
    return full_tensor() if full_tensor is not None else param


def needs_tower_probe(deepspeed: str | None, feature_cache: str | None) -> bool:
    """True under ZeRO-3 when batches run the tower (no feature cache): then a rank whose batch
    has no image must run it too (see the module docstring)."""
    return (
        deepspeed is not None
        and feature_cache is None
        and zero_stage(read_engine_file("--deepspeed", deepspeed)) == 3
    )
