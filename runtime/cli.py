"""The flags every command that loads a trained checkpoint shares (test.py, merge, export,
evaluation, the web chat), spelled once: base-path overrides and the base-weights check."""

from __future__ import annotations

import argparse


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
