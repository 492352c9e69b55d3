"""The flags every command that loads a trained checkpoint shares (test.py, merge, export,
evaluation, the web chat), spelled once: base-path overrides and the base-weights check; and the
model stack's known noise, silenced by each entry point's main(); and the prompt helpers of the
commands that ask about image files (`test.py`, the evaluation's prompts)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dataprocess.schema import IMAGE_MARKER

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """`--language_model` / `--vision_model` (the original script's `--base_language_model` /
    `--base_value_model` too) and `--allow_other_base`; read back with `checkpoint_overrides`."""
    parser.add_argument(
        "--language_model",
        "--base_language_model",
        help="the base LLM, when not at the path recorded in the checkpoint",
    )
    parser.add_argument(
        "--vision_model",
        "--base_value_model",
        help="the vision tower, when not at the path recorded in the checkpoint",
    )
    parser.add_argument(
        "--allow_other_base",
        action="store_true",
        help="load base weights other than the ones the checkpoint was trained on",
    )


def checkpoint_overrides(args: argparse.Namespace) -> dict:
    """The keyword arguments of `model.checkpoint.load_vlm` that `add_checkpoint_flags` set."""
    return {
        "language_model": args.language_model,
        "vision_model": args.vision_model,
        "allow_other_base": args.allow_other_base,
    }


# `import peft` imports bitsandbytes, whose CPU backend warns at import that the optional `kernels`
# package is missing - in every command that touches the model stack, `--help` included. Its 4-bit
# CPU matmul is not used here (QLoRA needs CUDA), so the one message is dropped; others still show.
_BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_KERNELS_HINT)


def silence_known_warnings() -> None:
    """Drop bitsandbytes' "pip install kernels" hint; called first in each entry point's main()
    (before peft is imported), never at import time. Calling it again changes nothing."""
    log = logging.getLogger(_BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsHint) for f in log.filters):
        log.addFilter(_DropKernelsHint())


def image_files(path: str | Path) -> list[Path]:
    """`--image_path`: a file, or every image file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--image_path {path}: the folder holds no image files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--image_path {path}: no such file or folder")
    return [path]


def with_image_marker(prompt: str, num_images: int) -> str:
    """Put one `<image>` marker per image in front of a prompt that has none."""
    if num_images and IMAGE_MARKER not in prompt:
        return "".join(f"{IMAGE_MARKER}\n" for _ in range(num_images)) + prompt
    return prompt
