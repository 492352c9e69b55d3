"""A generated image-question data set for the CPU demo: one coloured shape per small image.

Every answer can only be read off the image (colour, shape kind, or quadrant), and answers are
short fixed strings ("red", "circle", "top left"; "红色", "圆形", "左上"), so exact-match accuracy
is a meaningful score. About 30% of the records ask two or three questions in a row, each about
another attribute: evaluation answers a record's last question with the earlier turns as history,
so a model (or a prompt builder) that answers the first question instead scores wrong. Output, in the LLaVA chat.json schema:

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
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Bump when the drawing or the questions change, so old outputs are regenerated.
GENERATOR_VERSION = 2
# Share of records that ask two or three questions in a row (each about another attribute), so
# the demo learns, and its evaluation checks, that a follow-up is answered, not the first question.
MULTI_TURN_SHARE = 0.3

# name -> (RGB, Chinese answer). Saturated colours far from the light-grey background.
COLORS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 20, 20), "红色"),
    "green": ((20, 170, 20), "绿色"),
    "blue": ((20, 40, 220), "蓝色"),
    "yellow": ((230, 210, 0), "黄色"),
    "purple": ((140, 20, 170), "紫色"),
    "orange": ((245, 130, 0), "橙色"),
}
SHAPES: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "cross": "十字形",
}
# name -> ((column, row) of the quadrant, Chinese answer)
POSITIONS: dict[str, tuple[tuple[int, int], str]] = {
    "top left": ((0, 0), "左上"),
    "top right": ((1, 0), "右上"),
    "bottom left": ((0, 1), "左下"),
    "bottom right": ((1, 1), "右下"),
}
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "en": ("What color is the shape?", "Which colour is the object in the picture?"),
        "zh": ("图中图形是什么颜色？", "这个形状是什么颜色的？"),
    },
    "shape": {
        "en": ("What shape is in the image?", "Which shape is drawn?"),
        "zh": ("图中是什么形状？", "画的是哪种图形？"),
    },
    "position": {
        "en": ("Where is the shape?", "In which part of the image is the shape?"),
        "zh": ("图形在图片的哪个位置？", "这个形状在哪里？"),
    },
}
BACKGROUND_LEVEL = 200  # grey level of the background; noise is added around it


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows, and where (pixel box of the shape, inclusive)."""

    color: str
    shape: str
    position: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1)

    @property
    def center(self) -> tuple[int, int]:
        """A pixel that is always inside the drawn shape (centroid for the triangle)."""
        x0, y0, x1, y1 = self.box
        if self.shape == "triangle":  # apex at top centre: the centroid sits 2/3 of the way down
            return (x0 + x1) // 2, y0 + 2 * (y1 - y0) // 3
        return (x0 + x1) // 2, (y0 + y1) // 2


def answer_for(spec: ShapeSpec, attribute: str, lang: str) -> str:
    """The exact expected answer for a question about `attribute` in language `lang`."""
    value = getattr(spec, attribute)
    if lang == "en":
        return value
    table = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}[attribute]
    entry = table[value]
    return entry[1] if isinstance(entry, tuple) else entry


def sample_spec(rng: random.Random, image_size: int) -> ShapeSpec:
    """Draw a random colour, shape and quadrant, with jitter in size and place."""
    color = rng.choice(list(COLORS))
    shape = rng.choice(list(SHAPES))
    position = rng.choice(list(POSITIONS))
    (col, row), _ = POSITIONS[position]
    half = image_size // 2
    margin = max(1, image_size // 32)
    side = rng.randint(max(4, half * 9 // 16), half - 2 * margin)  # e.g. 9..14 px at 32 px
    x0 = col * half + rng.randint(margin, half - margin - side)
    y0 = row * half + rng.randint(margin, half - margin - side)
    return ShapeSpec(color, shape, position, (x0, y0, x0 + side - 1, y0 + side - 1))


def draw_spec(spec: ShapeSpec, image_size: int, noise: np.ndarray | None) -> Image.Image:
    """Render one RGB image; `noise` ([H, W, 3] int) perturbs the background only."""
    background = np.full((image_size, image_size, 3), BACKGROUND_LEVEL, dtype=np.int16)
    if noise is not None:
        background += noise
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    fill = COLORS[spec.color][0]
    x0, y0, x1, y1 = spec.box
    if spec.shape == "circle":
        draw.ellipse(spec.box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(spec.box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:  # cross: two bars a third of the side thick
        thick = max(1, (x1 - x0 + 1) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - thick // 2, y0, cx - thick // 2 + thick - 1, y1), fill=fill)
        draw.rectangle((x0, cy - thick // 2, x1, cy - thick // 2 + thick - 1), fill=fill)
    return image


@dataclass(frozen=True)
class ShapesConfig:
    """The parameters that determine the output; stored in the manifest."""

    num_train: int = 20000
    num_test: int = 200
    image_size: int = 32
    seed: int = 0
    noise: int = 12  # max absolute background noise per channel; 0 = flat background
    version: int = GENERATOR_VERSION


def _conversation(rng: random.Random, spec: ShapeSpec) -> list[dict[str, str]]:
    """One to three questions about different attributes, in one language; the image comes
    with the first question."""
    turns = 1 if rng.random() >= MULTI_TURN_SHARE else rng.choice((2, 3))
    lang = rng.choice(("en", "zh"))
    conversation = []
    for position, attribute in enumerate(rng.sample(list(QUESTIONS), k=turns)):
        question = rng.choice(QUESTIONS[attribute][lang])
        prefix = "<image>\n" if position == 0 else ""
        conversation.append({"from": "human", "value": prefix + question})
        conversation.append({"from": "gpt", "value": answer_for(spec, attribute, lang)})
    return conversation


def _write_split(out_dir: Path, split: str, count: int, config: ShapesConfig, seed: int) -> None:
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        spec = sample_spec(rng, config.image_size)
        noise = None
        if config.noise > 0:
            shape = (config.image_size, config.image_size, 3)
            noise = noise_rng.integers(-config.noise, config.noise + 1, size=shape, dtype=np.int16)
        name = f"images/{split}_{index:06d}.png"
        draw_spec(spec, config.image_size, noise).save(out_dir / name, compress_level=1)
        records.append(
            {
                "id": f"shapes_{split}_{index:06d}",
                "image": name,
                "conversations": _conversation(rng, spec),
            }
        )
    # A JSON list with one record per line: valid chat.json, and still readable with `head`.
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    (out_dir / f"{split}.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def generate_shapes_dataset(
    out_dir: str | Path,
    num_train: int = 20000,
    num_test: int = 200,
    image_size: int = 32,
    seed: int = 0,
    noise: int = 12,
) -> Path:
    """Write the demo data set under `out_dir` (skipped if already there with these parameters).

    Returns `out_dir` as a Path. The test split uses its own seed stream, so it does not
    change when `num_train` changes.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    out = Path(out_dir)
    config = ShapesConfig(num_train, num_test, image_size, seed, noise)
    manifest = out / "manifest.json"
    outputs = [out / "train.json", out / "test.json"]
    complete = manifest.is_file() and all(path.is_file() for path in outputs)
    if complete and json.loads(manifest.read_text(encoding="utf-8")) == asdict(config):
        logger.info("shapes data set already in %s with the same parameters; skipped", out)
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # written last: a crash midway leaves no valid manifest
    # Two seed streams derived from `seed` (never 0/1 offsets that collide between seeds).
    _write_split(out, "train", num_train, config, seed * 2 + 1)
    _write_split(out, "test", num_test, config, seed * 2 + 2)
    manifest.write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    logger.info("wrote %d train and %d test shapes records to %s", num_train, num_test, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m demo.shapes --out DIR [--num-train N] [--num-test N] ...`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=int, default=12, help="background noise; 0 = none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = generate_shapes_dataset(
        args.out, args.num_train, args.num_test, args.image_size, args.seed, args.noise
    )
    print(out)


if __name__ == "__main__":
    main()
