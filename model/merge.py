"""Merge a LoRA checkpoint into its base LLM: a standalone directory that loads without peft.

    python -m model.merge outputs/run1 outputs/run1-merged [--language_model DIR] [--vision_model DIR]

The merged LLM is written in the original checkpoint layout (for Qwen-7B: `transformer.h.N...`
tensor names), next to the projector and the vision settings; `test.py --model_weights
outputs/run1-merged` then runs it.
"""

from __future__ import annotations

import argparse
import logging

from model.checkpoint import merge_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge LoRA adapters into the base LLM.")
    parser.add_argument("checkpoint", help="a training output or checkpoint directory")
    parser.add_argument("out_dir", help="where the merged model is written")
    parser.add_argument("--language_model", help="override the base LLM path recorded in training")
    parser.add_argument("--vision_model", help="override the vision tower path")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = merge_checkpoint(
        args.checkpoint,
        args.out_dir,
        language_model=args.language_model,
        vision_model=args.vision_model,
        dtype=args.dtype,
    )
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
