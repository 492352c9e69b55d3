"""Export a checkpoint as a standalone transformers LLaVA directory, or as llama.cpp GGUF files.

    python -m runtime.export outputs/run1 exports/run1 [--dtype bfloat16] [--overwrite]
    python -m runtime.export outputs/run1 exports/run1-gguf --format gguf [--outtype f16]

CHECKPOINT is a training output, a checkpoint-N directory or a `runtime.merge` output. Towers and
projectors LLaVA cannot hold (open_clip, Qwen-VL's, the resampler) are refused before anything is
written; a non-empty OUT_DIR is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.checkpoint import CheckpointError
from runtime.cli import add_checkpoint_flags, checkpoint_overrides, silence_known_warnings
from runtime.export.gguf_export import OUTTYPES, export_gguf
from runtime.export.writer import DEFAULT_SHARD_SIZE, EXPORT_DTYPES, export_checkpoint

logger = logging.getLogger("runtime.export")
FORMATS = ("hf", "gguf")


def main(argv: list[str] | None = None) -> None:
    silence_known_warnings()
    parser = argparse.ArgumentParser(description="Export a checkpoint as a transformers LLaVA.")
    parser.add_argument("checkpoint", help="a training output, checkpoint-N or merged directory")
    parser.add_argument("out_dir", help="where the LLaVA directory is written (new or empty)")
    parser.add_argument(
        "--format", default="hf", choices=FORMATS, help="hf: transformers LLaVA; gguf: llama.cpp"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=EXPORT_DTYPES, help="--format hf")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="--format gguf")
    parser.add_argument("--max_shard_size", default=DEFAULT_SHARD_SIZE, help="e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    add_checkpoint_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.format == "gguf":
            out = export_gguf(
                args.checkpoint,
                args.out_dir,
                outtype=args.outtype,
                overwrite=args.overwrite,
                **checkpoint_overrides(args),
            )
            print(f"GGUF files (model.gguf, mmproj.gguf, Modelfile) written to {out}")
            return
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            **checkpoint_overrides(args),
        )
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        logger.error("%s", error)
        sys.exit(2)
    print(f"LLaVA model written to {out}")


if __name__ == "__main__":
    main()
