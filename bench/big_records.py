"""Peak memory and wall time of reading a large record file (LLaVA mix665k is ~1 GB).

    python -m bench.big_records --out /tmp/big --count 1000000
    python -m bench.big_records --out /tmp/big --count 1000000 --repo /tmp/oldtree  # older code

Writes ``big.json`` (a JSON list) and ``big.jsonl`` with ``count`` LLaVA records (2-6 turns,
questions of 5-30 words, answers of 10-150 words, 9 in 10 showing one of a few hundred small
PNGs), streaming, so the generator itself stays small. Then, for each format, it runs in a fresh
subprocess ``python -m dataprocess validate --data FILE --image_folder DIR`` and a bare read
(``iter_raw_records`` counting records), with ``--repo`` as working directory, and prints one
table row each: wall time and peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a helper
process that runs only that command).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.long_records import WORDS

NUM_IMAGES = 300
# Through the package's public name, which older trees (--repo) export too; the module moved.
READ_ONLY = (
    "import sys; from dataprocess import iter_raw_records; "
    "print(sum(1 for _ in iter_raw_records(sys.argv[1])))"
)
# Runs argv[2:] (output to the file argv[1], "-" for none) and reports its wall time and peak
# RSS; a fresh process per measurement, so RUSAGE_CHILDREN holds that one command only.
MEASURE = """
import json, resource, subprocess, sys, time
log = open(sys.argv[1], "w") if sys.argv[1] != "-" else subprocess.DEVNULL
start = time.perf_counter()
rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"rc": rc, "wall_s": wall, "max_rss_mib": rss / 1024}))
"""


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."


def records(count: int, seed: int = 0) -> Iterator[dict]:
    """``count`` LLaVA records, generated one at a time."""
    rng = random.Random(seed)
    for i in range(count):
        conversations = []
        with_image = rng.random() < 0.9
        for turn in range(rng.randint(1, 3)):
            question = _text(rng, 5, 30)
            if with_image and turn == 0:
                question = "<image>\n" + question
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": _text(rng, 10, 150)})
        record: dict = {"id": f"big_{i:07d}"}
        if with_image:
            record["image"] = f"images/{rng.randrange(NUM_IMAGES):03d}.png"
        record["conversations"] = conversations
        yield record


def write_data(out: Path, count: int) -> tuple[Path, Path, Path]:
    """The image folder, the JSON list and the JSONL file (reused when already there)."""
    from PIL import Image

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(NUM_IMAGES):
        path = images / f"{k:03d}.png"
        if not path.exists():
            Image.new("RGB", (32, 32), (k % 256, (7 * k) % 256, (13 * k) % 256)).save(path)
    json_path, jsonl_path = out / "big.json", out / "big.jsonl"
    if not json_path.exists():
        with json_path.open("w", encoding="utf-8") as file:
            file.write("[")
            for i, record in enumerate(records(count)):
                file.write(("," if i else "") + "\n" + json.dumps(record, ensure_ascii=False))
            file.write("\n]\n")
    if not jsonl_path.exists():
        with jsonl_path.open("w", encoding="utf-8") as file:
            file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records(count))
    return out, json_path, jsonl_path


def measure(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> dict:
    """Wall time, peak RSS and exit status of ``command`` run alone in a fresh helper process;
    its output goes to ``log`` (or nowhere)."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(log) if log else "-", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and images")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--repo", type=Path, default=Path("."), help="code to measure")
    parser.add_argument("--skip", nargs="*", default=[], help="skip 'validate' and/or 'read'")
    args = parser.parse_args()
    folder, json_path, jsonl_path = write_data(args.out, args.count)
    print("| format | command | size | wall | peak RSS | exit |")
    print("|---|---|---|---|---|---|")
    for path in (json_path, jsonl_path):
        commands = {
            "validate": [
                sys.executable, "-m", "dataprocess", "validate",
                "--data", str(path), "--image_folder", str(folder),
            ],
            "read": [sys.executable, "-c", READ_ONLY, str(path)],
        }  # fmt: skip
        for name, command in commands.items():
            if name in args.skip:
                continue
            got = measure(command, args.repo)
            size = path.stat().st_size / 2**20
            print(
                f"| {path.suffix} | {name} | {size:,.0f} MiB | {got['wall_s']:.1f} s "
                f"| {got['max_rss_mib']:,.0f} MiB | {got['rc']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
