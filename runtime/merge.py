"""Merge a LoRA checkpoint into its base LLM: a standalone directory that loads without peft.

    python -m runtime.merge outputs/run1 outputs/run1-merged [--language_model DIR] [--overwrite]

(`python -m model.merge` is the same command under its first name.) The merged LLM is written in
the original checkpoint layout (for Qwen-7B: `transformer.h.N...` tensor names), next to the
projector and the vision settings; `test.py --model_weights outputs/run1-merged` then runs it. The
output is built in a hidden sibling directory and swapped into place once complete
(`runtime/outputs.py`); a non-empty destination is refused unless `--overwrite`, and one whose
replacement would delete what the merge reads (the checkpoint, its run directory, its base) always.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.checkpoint import (
    LLM_DIR,
    PROJECTOR_FILE,
    VLM_CONFIG,
    CheckpointError,
    checkpoint_sources,
    load_vlm,
    readable_weights,
    save_projector_weights,
)
from model.config import DTYPE_NAMES
from runtime.cli import add_checkpoint_flags, checkpoint_overrides, silence_known_warnings
from runtime.outputs import atomic_directory, check_destination, check_not_a_source

logger = logging.getLogger(__name__)


def merge_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False, **load_kwargs
) -> Path:
    """Applies `merge_and_unload` and writes a directory that loads without peft.

    The base LLM is loaded in 16/32-bit even when training used 4-bit QLoRA, so the merged
    weights come from the original checkpoint rather than from dequantized 4-bit ones.
    """
    from peft import PeftModel  # imported where used: it imports bitsandbytes (runtime/cli.py)

    check_destination(out_dir, overwrite=overwrite, flag="OUT_DIR")
    overrides = {k: load_kwargs.get(k) for k in ("language_model", "vision_model")}
    check_not_a_source(out_dir, checkpoint_sources(checkpoint, **overrides), flag="OUT_DIR")
    vlm, tokenizer, description = load_vlm(checkpoint, **{**load_kwargs, "bits": 16})
    if isinstance(vlm.llm, PeftModel):
        vlm.llm = vlm.llm.merge_and_unload()
    with atomic_directory(out_dir, overwrite=overwrite, flag="OUT_DIR") as staging:
        vlm.llm.save_pretrained(staging / LLM_DIR)
        tokenizer.save_pretrained(staging / LLM_DIR)
        tokenizer.save_pretrained(staging)
        save_projector_weights(vlm, staging)
        merged = {
            **description,
            "weights": [PROJECTOR_FILE, LLM_DIR],
            "merged_from": str(Path(checkpoint).resolve()),
        }
        (staging / VLM_CONFIG).write_text(json.dumps(merged, indent=2), encoding="utf-8")
        readable_weights(staging)
    logger.info("merged %s into %s", checkpoint, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    silence_known_warnings()
    parser = argparse.ArgumentParser(description="Merge LoRA adapters into the base LLM.")
    parser.add_argument("checkpoint", help="a training output or checkpoint directory")
    parser.add_argument("out_dir", help="where the merged model is written (new or empty)")
    add_checkpoint_flags(parser)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = merge_checkpoint(
            args.checkpoint,
            args.out_dir,
            overwrite=args.overwrite,
            dtype=args.dtype,
            **checkpoint_overrides(args),
        )
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        logger.error("%s", error)
        sys.exit(2)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
