"""What a record's token length depends on besides its text, from `dataprocess stats`' flags: the
image processor (a fixed grid of N from the tower, a checkpoint or `--num_image_tokens`; an
anyres tiling from a checkpoint or `--image_aspect_ratio anyres`) and the system prompt. The model
stack is imported inside the functions (`dataprocess` itself needs no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_CONFIG = "vlm_config.json"  # written by model/checkpoint.py (VLM_CONFIG)


@dataclass(frozen=True)
class StatsSettings:
    """What a length depends on besides the text: the image processor and the system prompt."""

    image_processor: Any  # visual.processing.ImageProcessor
    system: str
    num_image_tokens_from: str  # the flag it came from, for the summary

    @property
    def num_image_tokens(self) -> int | None:
        """Tokens per image of a fixed grid; None when the count depends on the size."""
        return self.image_processor.fixed_num_image_tokens


def count_only(num_image_tokens: int) -> Any:
    """A fixed grid of `num_image_tokens` per image that only counts (no tower loaded)."""
    from visual.processing import FixedGridProcessor  # imports torch

    return FixedGridProcessor(None, num_image_tokens)


def _checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / CHECKPOINT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--model_weights {checkpoint}: no {CHECKPOINT_CONFIG} in it") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("num_image_tokens"), int):
        raise ValueError(f"{path}: no integer 'num_image_tokens'")
    return config


def resolve_settings(
    *,
    num_image_tokens: int | None = None,
    vision_model: str | None = None,
    vision_library: str = "transformers",
    vision_pretrained: str | None = None,
    model_weights: Path | None = None,
    system: str | None = None,
    tiling: dict[str, Any] | None = None,
) -> StatsSettings:
    """N tokens per image from the flags: the override, else the tower and/or the checkpoint
    (which must agree), and the system prompt: the flag, else the checkpoint's, else training's.
    An anyres checkpoint, or `tiling` ({"image_aspect_ratio": "anyres", "image_grid_pinpoints",
    "image_max_tiles"} from the flags) with a tower, counts by image size (`anyres_processor`).
    """
    found: dict[str, int] = {}
    checkpoint: dict[str, Any] = {}
    processor = None
    if model_weights is not None:
        checkpoint = _checkpoint_config(Path(model_weights))
        found["--model_weights"] = checkpoint["num_image_tokens"]
    tower = {"vision_model": vision_model, "vision_pretrained": vision_pretrained}
    if vision_model is not None:
        tower["vision_library"] = vision_library
    anyres = _anyres_vision(checkpoint, {**tower, **(tiling or {})})
    if anyres is not None and num_image_tokens is None:
        source = "--model_weights" if model_weights is not None else "--vision_model"
        processor = anyres_processor(anyres)
        return StatsSettings(processor, _system_prompt(system, checkpoint), f"{source} (anyres)")
    if vision_model is not None and num_image_tokens is None:
        from visual import load_vision_tower  # imports torch

        tower = load_vision_tower(
            vision_model, library=vision_library, pretrained=vision_pretrained
        )
        processor = tower.image_processor
        found["--vision_model"] = processor.fixed_num_image_tokens
    if num_image_tokens is not None:
        if num_image_tokens < 0:
            raise ValueError(f"--num_image_tokens must be >= 0, got {num_image_tokens}")
        found = {"--num_image_tokens": num_image_tokens}
    elif not found:
        raise ValueError(
            "stats needs the tokens per image: pass --vision_model (the tower), --model_weights "
            "(a checkpoint directory) or --num_image_tokens"
        )
    elif len(set(found.values())) > 1:
        raise ValueError(
            f"--vision_model {vision_model} gives {found['--vision_model']} tokens per image but "
            f"--model_weights {model_weights} was trained with {found['--model_weights']}"
        )
    flag, tokens = next(iter(found.items()))
    if flag != "--vision_model":
        processor = count_only(tokens)
    system = _system_prompt(system, checkpoint)
    return StatsSettings(image_processor=processor, system=system, num_image_tokens_from=flag)


def _system_prompt(system: str | None, checkpoint: dict[str, Any]) -> str:
    if system is not None:
        return system
    from qwen.chat_format import DEFAULT_SYSTEM_PROMPT  # the training default, one owner

    return checkpoint.get("system_prompt") or DEFAULT_SYSTEM_PROMPT


def _anyres_vision(checkpoint: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any] | None:
    """The vision settings to tile with (the checkpoint's, flags over them), or None when
    neither says `image_aspect_ratio` anyres."""
    saved = checkpoint.get("vision") or {}
    given = {key: value for key, value in flags.items() if value is not None}
    vision = {**saved, **given}
    if vision.get("image_aspect_ratio") != "anyres":
        for flag in ("image_grid_pinpoints", "image_max_tiles"):
            if flag in given:
                raise ValueError(f"--{flag} applies to --image_aspect_ratio anyres only")
        return None
    if not vision.get("vision_model"):
        raise ValueError(
            "--image_aspect_ratio anyres needs --vision_model (the tower that tiles) or "
            "--model_weights of an anyres checkpoint"
        )
    return vision


def anyres_processor(vision: dict[str, Any]) -> Any:
    """The AnyRes image processor of vision settings (a checkpoint's `vision` section or the
    flags): the tower's tiling with its pinpoints and tile cap, as training builds it."""
    from visual import load_vision_tower  # imports torch
    from visual.anyres import AnyResImageProcessor

    tower = load_vision_tower(
        vision["vision_model"],
        library=vision.get("vision_library", "transformers"),
        pretrained=vision.get("vision_pretrained"),
        image_aspect_ratio="anyres",
    )
    pinpoints, max_tiles = vision.get("image_grid_pinpoints"), vision.get("image_max_tiles")
    return AnyResImageProcessor.from_tower(tower, pinpoints, max_tiles)
