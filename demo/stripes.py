"""A generated data set where resolution matters: fine stripes whose orientation is the answer.

Each image is `2 * tile_size` pixels square (64 for the demo's 32 px tower) and filled with
one-pixel stripes of two random colours, running horizontally or vertically. Downscaled to one
tile (what a fixed grid sees: every 2 x 2 block averaged by the resampling filter) both
orientations become the same flat colour, so the answer cannot be read; AnyRes cuts the image into
2 x 2 full-resolution tiles, where the stripes are plain. Output, in the LLaVA chat.json schema:

    out_dir/images/{split}_{index:06d}.png
    out_dir/train.json, out_dir/test.json   records {"id", "image", "conversations"}
    out_dir/manifest.json                   the parameters; a re-run with the same ones is a no-op

Image paths in the records are relative to out_dir (pass out_dir as the image folder).
Deterministic for a given seed. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ORIENTATIONS = ("horizontal", "vertical")
QUESTIONS = (
    "Which way do the stripes run? Answer horizontal or vertical.",
    "Are the stripes horizontal or vertical?",
)


@dataclass(frozen=True)
class StripesConfig:
    num_train: int
    num_test: int
    tile_size: int
    seed: int
    version: int = GENERATOR_VERSION


def draw_stripes(
    orientation: str, size: int, colours: tuple[tuple[int, ...], tuple[int, ...]], phase: int
) -> Image.Image:
    """A `size` x `size` image of one-pixel stripes alternating the two colours."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {', '.join(ORIENTATIONS)}")
    index = (np.arange(size) + phase) % 2  # [size] 0/1 per row or column
    mask = index[:, None] if orientation == "horizontal" else index[None, :]
    mask = np.broadcast_to(mask, (size, size))  # [H, W]
    palette = np.array(colours, dtype=np.uint8)  # [2, 3]
    return Image.fromarray(palette[mask])  # [H, W, 3]


def _colours(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two colours far enough apart that the stripes are plain at full resolution."""
    while True:
        first = tuple(rng.randrange(256) for _ in range(3))
        second = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(first, second, strict=True)) >= 240:
            return first, second


def _write_split(out_dir: Path, split: str, count: int, config: StripesConfig, seed: int) -> None:
    rng = random.Random(seed)
    size = 2 * config.tile_size
    records = []
    for index in range(count):  # a few hundred images, each drawn in one vectorised step
        orientation = rng.choice(ORIENTATIONS)
        image = draw_stripes(orientation, size, _colours(rng), rng.randrange(2))
        name = f"images/{split}_{index:06d}.png"
        image.save(out_dir / name, compress_level=1)
        conversation = [
            {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
            {"from": "gpt", "value": orientation},
        ]
        records.append({"id": f"stripes_{split}_{index:06d}", "image": name,
                        "conversations": conversation})  # fmt: skip
    lines = ",\n".join(json.dumps(record) for record in records)
    (out_dir / f"{split}.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def generate_stripes_dataset(
    out_dir: str | Path,
    num_train: int = 4000,
    num_test: int = 200,
    tile_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write the data set under `out_dir` (skipped if already there with these parameters)."""
    if tile_size < 8:
        raise ValueError(f"tile_size must be at least 8 pixels, got {tile_size}")
    out = Path(out_dir)
    config = StripesConfig(num_train, num_test, tile_size, seed)
    manifest = out / "manifest.json"
    complete = manifest.is_file() and all((out / f"{s}.json").is_file() for s in ("train", "test"))
    if complete and json.loads(manifest.read_text(encoding="utf-8")) == asdict(config):
        logger.info("stripes data set already in %s with the same parameters; skipped", out)
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # written last: a crash midway leaves no valid manifest
    _write_split(out, "train", num_train, config, seed * 2 + 1)
    _write_split(out, "test", num_test, config, seed * 2 + 2)
    manifest.write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    logger.info("wrote %d train and %d test stripes records to %s", num_train, num_test, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m demo.stripes --out DIR [--num-train N] [--num-test N] [--tile-size S]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--tile-size", type=int, default=32, help="the vision tower's input side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(
        generate_stripes_dataset(args.out, args.num_train, args.num_test, args.tile_size, args.seed)
    )


if __name__ == "__main__":
    main()
