"""Extract Qwen-VL's visual encoder into a standalone tower directory.

    python -m visual.qwen_vl extract /models/Qwen-VL-Chat towers/qwen-vl-visual [--overwrite]

Reads only the `transformer.visual.*` tensors of a Qwen-VL / Qwen-VL-Chat checkpoint directory
(or hub id), checks every name and shape against its config.json, and writes `config.json` (the
`visual` section, n_queries spelled out) and `model.safetensors` (the same tensor names, the
stored dtype: about 3.9 GB in bf16). `load_vision_tower(OUT_DIR, library="qwen_vl")` loads it
like the full checkpoint. The directory is built in a hidden sibling and renamed into place when
complete, so OUT_DIR is either absent, the old directory, or the whole new one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from visual.qwen_vl_checkpoint import (
    CONFIG_FILE,
    PREFIX,
    checkpoint_dir,
    read_visual_config,
    read_visual_tensors,
)
from visual.qwen_vl_tower import expected_shapes

logger = logging.getLogger(__name__)

EXTRACTED_FILE = "model.safetensors"
EXTRACTED_MODEL_TYPE = "qwen_vl_visual"


def extract(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the visual encoder of `source` (its stored dtype) into `out_dir`, atomically."""
    source, out = checkpoint_dir(source), Path(out_dir)
    if out.resolve() == source.resolve():
        raise ValueError(f"OUT_DIR {out}: is the source checkpoint itself")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"OUT_DIR {out}: exists and is not empty; pass --overwrite to replace it")
    config, visual = read_visual_config(source)
    tensors = read_visual_tensors(source, expected_shapes(config))
    state = {PREFIX + name: tensor.contiguous() for name, tensor in tensors.items()}
    description = {
        "model_type": EXTRACTED_MODEL_TYPE,
        "visual": {**visual, **asdict(config)},  # n_queries written out, not left to a default
        "extracted_from": str(source.resolve()),
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(state, str(staging / EXTRACTED_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(
            json.dumps(description, indent=2) + "\n", encoding="utf-8"
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(staging, out)
    logger.info("extracted %d visual tensors from %s into %s", len(state), source, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visual.qwen_vl", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("extract", help="write transformer.visual.* into a standalone tower dir")
    run.add_argument("source", help="a Qwen-VL / Qwen-VL-Chat checkpoint directory or hub id")
    run.add_argument("out_dir", help="the tower directory to create (new or empty)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = extract(args.source, args.out_dir, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # a bad path or checkpoint: one clear line
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = (out / EXTRACTED_FILE).stat().st_size
    print(json.dumps({"tower": str(out), "bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
