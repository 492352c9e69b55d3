"""Builds (once, cached) everything the demo needs: tiny models and the shapes data set.

    python -m demo.prepare [--root demo_assets]

Each part is skipped when it already exists, so `train.sh` can call this every time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def prepare_demo(root: str | Path = "demo_assets", num_train: int = 20000, num_test: int = 200):
    from demo.shapes import generate_shapes_dataset
    from demo.tiny_models import DEMO_QWEN, save_tiny_clip, save_tiny_qwen
    from demo.tiny_towers import save_tiny_siglip_tower

    root = Path(root)
    qwen_dir, clip_dir, siglip_dir = root / "tiny-qwen", root / "tiny-clip", root / "tiny-siglip"
    if not _is_current_tiny_qwen(qwen_dir):
        logger.info("building a tiny random QWen in %s", qwen_dir)
        save_tiny_qwen(qwen_dir, **DEMO_QWEN)
    if not (clip_dir / "config.json").is_file():
        logger.info("building a tiny random CLIP tower in %s", clip_dir)
        save_tiny_clip(clip_dir)
    if not (siglip_dir / "config.json").is_file():
        # The demo's second tower (`--vision_model demo_assets/tiny-siglip`): same 32 px images and
        # 16 tokens, no class token - the one llama.cpp runs exactly (docs/GGUF.md).
        logger.info("building a tiny random SigLIP tower in %s", siglip_dir)
        save_tiny_siglip_tower(siglip_dir)
    generate_shapes_dataset(root / "shapes", num_train=num_train, num_test=num_test)
    return root


def _is_current_tiny_qwen(qwen_dir: Path) -> bool:
    """False when missing, or built by an older recipe (e.g. the 0.02 init) and so rebuilt."""
    import json

    from demo.tiny_models import DEMO_QWEN

    config = qwen_dir / "config.json"
    if not config.is_file():
        return False
    stored = json.loads(config.read_text(encoding="utf-8")).get("initializer_range")
    return stored == DEMO_QWEN["initializer_range"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="demo_assets")
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_test", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = prepare_demo(args.root, args.num_train, args.num_test)
    print(f"demo assets ready in {root}")


if __name__ == "__main__":
    main()
