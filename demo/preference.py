"""The preference-tuning demo: a model that SFT left saying "yes" to any "Is there a ...?" question
learns from generated pairs to say "no" when the shape is absent, measured POPE-style.

    python -m demo.preference --root demo_assets     # writes demo_assets/pope/

Written under `root/pope/` (images generated like `demo.shapes`, one shape each, its own seeds):
- `yes_sft.json`: existence questions about the shape the image shows, all answered "Yes" - the
  bias of instruction data that only asks about objects that are there (the cause POPE measures).
  An SFT round on it (`--init_from` the shapes demo) leaves a model that says "yes" to everything;
- `pairs.json`: preference records, half about the shape shown (chosen "Yes", rejected "No"),
  half about another shape (chosen "No", rejected "Yes");
- `coco_pope_shapes.json`: the held-out set in POPE's own layout (JSON lines `question_id`,
  `image`, `text`, `label`), half present, half absent, for `runtime.evaluation --benchmark pope`.
Questions carry the instruction evaluation appends to POPE's ("Please answer yes or no.") so the
training prompts are the prompts evaluation asks. Deterministic for a seed; no torch needed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from demo.shapes import SHAPES, draw_spec, sample_spec

TEMPLATES = ("Is there a {} in the image?", "Does the image show a {}?")
# runtime.evaluation.questions.YES_NO_INSTRUCTION, spelled here so that demo/ needs no torch
INSTRUCTION = "Please answer yes or no."
IMAGE_SIZE, NOISE = 32, 12


def _draw(out: Path, split: str, count: int, seed: int) -> list[tuple[str, str]]:
    """Draw `count` images; returns (image path relative to `out`, shape shown) for each."""
    rng, noise_rng = random.Random(seed), np.random.default_rng(seed)
    drawn = []
    for index in range(count):
        spec = sample_spec(rng, IMAGE_SIZE)
        shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
        noise = noise_rng.integers(-NOISE, NOISE + 1, size=shape, dtype=np.int16)
        name = f"images/{split}_{index:06d}.png"
        draw_spec(spec, IMAGE_SIZE, noise).save(out / name, compress_level=1)
        drawn.append((name, spec.shape))
    return drawn


def _question(rng: random.Random, shape: str) -> str:
    return f"{rng.choice(TEMPLATES).format(shape)} {INSTRUCTION}"


def _asked(rng: random.Random, shown: str, present: bool) -> str:
    return shown if present else rng.choice([s for s in SHAPES if s != shown])


def write_demo(root: str | Path, num_sft: int = 2000, num_pairs: int = 2000, num_test: int = 200):
    """Write the three files (and their images) under `root/pope`; returns that folder."""
    out = Path(root) / "pope"
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sft = [
        {"id": f"yes_{i}", "image": name,
         "conversations": [{"from": "human", "value": "<image>\n" + _question(rng, shape)},
                           {"from": "gpt", "value": "Yes"}]}
        for i, (name, shape) in enumerate(_draw(out, "sft", num_sft, seed=11))
    ]  # fmt: skip
    pairs = []
    for i, (name, shape) in enumerate(_draw(out, "pairs", num_pairs, seed=12)):
        present = i % 2 == 0
        answers = ("Yes", "No") if present else ("No", "Yes")
        question = _question(rng, _asked(rng, shape, present))
        pairs.append({"id": f"pair_{i}", "image": name,
                      "conversations": [{"from": "human", "value": "<image>\n" + question}],
                      "chosen": answers[0], "rejected": answers[1]})  # fmt: skip
    test = []
    for i, (name, shape) in enumerate(_draw(out, "test", num_test, seed=13)):
        present = i % 2 == 0
        text = rng.choice(TEMPLATES).format(_asked(rng, shape, present))
        test.append({"question_id": i, "image": name, "text": text,
                     "label": "yes" if present else "no"})  # fmt: skip
    (out / "yes_sft.json").write_text(json.dumps(sft, ensure_ascii=False), encoding="utf-8")
    (out / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    lines = "".join(json.dumps(row) + "\n" for row in test)
    (out / "coco_pope_shapes.json").write_text(lines, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="demo_assets")
    parser.add_argument("--num_sft", type=int, default=2000)
    parser.add_argument("--num_pairs", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=200)
    args = parser.parse_args(argv)
    out = write_demo(args.root, args.num_sft, args.num_pairs, args.num_test)
    print(f"preference demo data written to {out}")


if __name__ == "__main__":
    main()
