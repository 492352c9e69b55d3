"""Long multi-turn records for memory checks: up to 6 turns, answers of 20-200 words, so most
tokens of a 2048-token sample are supervised (what stage 2 on mix665k looks like to the loss).

    python -m bench.long_records --image_folder demo_assets/shapes --out /tmp/long.json --count 64

Images are taken from the folder's `images/` (e.g. the demo's shapes), one per record.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [
    "the",
    "shape",
    "colour",
    "image",
    "left",
    "right",
    "top",
    "bottom",
    "circle",
    "square",
    "triangle",
    "cross",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "small",
    "large",
    "near",
    "far",
    "edge",
    "centre",
    "background",
    "noise",
    "pixel",
    "bright",
    "dark",
    "because",
    "therefore",
    "however",
    "while",
    "which",
    "quite",
    "very",
    "rather",
    "almost",
    "exactly",
]


def long_records(
    image_names: list[str], count: int, seed: int = 0, max_turns: int = 6, max_words: int = 200
) -> list[dict]:
    """`count` records of 3..max_turns user/assistant pairs; answers of 20..max_words words,
    questions of 10 words."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        conversation = []
        for turn in range(rng.randint(3, max_turns)):
            question = " ".join(rng.choices(WORDS, k=10)) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, max_words))) + "."
            prefix = "<image>\n" if turn == 0 else ""
            conversation += [
                {"from": "human", "value": prefix + question},
                {"from": "gpt", "value": answer},
            ]
        image = image_names[index % len(image_names)]
        records.append({"id": f"long_{index:05d}", "image": image, "conversations": conversation})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_turns", type=int, default=6)
    parser.add_argument("--max_words", type=int, default=200, help="longest answer, in words")
    args = parser.parse_args(argv)
    names = sorted(p.relative_to(args.image_folder).as_posix()
                   for p in (args.image_folder / "images").glob("*.png"))[:500]  # fmt: skip
    if not names:
        raise SystemExit(f"--image_folder {args.image_folder}: no images/*.png in it")
    records = long_records(names, args.count, args.seed, args.max_turns, args.max_words)
    args.out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
