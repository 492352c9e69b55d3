"""Is this the base a checkpoint was trained on? Checked on every load, before its weights load.

The trained weights (LoRA, projector) only mean something on the frozen base weights they were
trained on. `check_base` compares the loaded bases with the fingerprints recorded in
`vlm_config.json` (`identity.fingerprint.module_fingerprint`, every parameter; checkpoints
written before it hold a first-parameter string, still checked that way), and
`check_not_merged_base` refuses a merged model's LLM as a LoRA checkpoint's base before loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from identity.fingerprint import fingerprints_differ, module_fingerprint

logger = logging.getLogger(__name__)

_LEGACY_VALUES = 1 << 16
VLM_CONFIG = "vlm_config.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the model it is loaded into."""


def _legacy_fingerprint(module: nn.Module) -> str:
    """The fingerprint of checkpoints written before `identity.fingerprint` (a string in
    `base_fingerprint`): the first values of the first parameter only, still checked that way."""
    param = next(iter(module.parameters()))  # names differ under peft wrappers; values do not
    values = param.detach().reshape(-1)[:_LEGACY_VALUES].to("cpu", torch.bfloat16)
    digest = hashlib.sha256(str(tuple(param.shape)).encode())
    digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


_BASE_FLAGS = {"language_model": "language_model", "vision": "vision_model"}


def base_differs(recorded: str | dict, module: nn.Module) -> tuple[bool, str]:
    """(differs?, what the loaded weights give) against a recorded fingerprint: the all-parameter
    one (`identity.fingerprint`), or an old checkpoint's first-parameter string."""
    if isinstance(recorded, str):
        got = _legacy_fingerprint(module)
        return got != recorded, got
    got = module_fingerprint(module)
    shown = got["all"] or f"{got['plain']} (4-bit: embeddings and norms compared)"
    return fingerprints_differ(recorded, got), shown


def check_base(description: dict, vlm, *, llm: bool, allow_other: bool, where: str = "") -> None:
    """Compare the loaded base weights with the fingerprint recorded at training time; refuse
    (or, with `allow_other`, warn loudly) on a mismatch, naming the path trained on."""
    recorded = description.get("base_fingerprint") or {}
    parts = {"vision": vlm.vision, **({"language_model": vlm.llm} if llm else {})}
    for part, module in parts.items():
        if part not in recorded:
            continue
        differs, got = base_differs(recorded[part], module)
        if not differs:
            continue
        flag = _BASE_FLAGS[part]
        trained_on = (description.get(part) or {}).get(flag)
        was = recorded[part] if isinstance(recorded[part], str) else recorded[part].get("all")
        hint = "; a merged model's language_model/ holds the LoRA already" if llm else ""
        message = (
            f"{where}trained on other {part} weights (fingerprint {was}, these give {got}; "
            f"trained on --{flag} {trained_on}{hint if part == 'language_model' else ''}): its "
            "answers would be confident garbage"
        )
        if not allow_other:
            raise CheckpointError(f"{message}. Pass --allow_other_base to load it anyway")
        logger.warning("%s (--allow_other_base given: loading anyway)", message.upper())


def check_not_merged_base(language_model: str | None, checkpoint: Path) -> None:
    """Refuse, before any weight loads, the `language_model/` of a merged model (`runtime.merge`
    records `merged_from`) as the base of a LoRA checkpoint: the adapter would apply twice. Also
    catches what old first-parameter fingerprints cannot (a merge leaves the embedding alone)."""
    if language_model is None:
        return
    merged = Path(language_model).resolve().parent / VLM_CONFIG
    try:
        merged_from = json.loads(merged.read_text(encoding="utf-8")).get("merged_from")
    except (OSError, ValueError, AttributeError):
        return
    if merged_from:
        raise CheckpointError(
            f"--language_model {language_model}: the LLM of a merged model ({merged_from} merged "
            f"in), so {checkpoint}'s LoRA adapter would apply twice; load the merged model itself "
            f"(--model_weights {merged.parent}) or give the base LLM"
        )
