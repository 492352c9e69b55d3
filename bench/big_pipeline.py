"""Peak memory and wall time of ``dataprocess build`` and of train.py's data preparation on a
large record file (the files of :mod:`bench.big_records`).

    python -m bench.big_pipeline --out /tmp/big --count 1000000
    python -m bench.big_pipeline --out /tmp/big --count 1000000 --repo /tmp/oldtree  # older code

Each row is one fresh process, measured like :mod:`bench.big_records` (wall time and
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a helper that runs only that command):

- ``build``: ``python -m dataprocess build`` with one ``llava`` source reading ``big.json``
  (every image checked), writing ``built.json`` (shuffled) next to it;
- ``prep (first load)``: train.py's data preparation, up to its first training step, with the
  tiny random demo models (``demo.tiny_models``), ``--model_max_length 2048`` (no sample is cut)
  and an empty ``datasets`` cache: train.py's flags and model, ``runtime.data.build_datasets``
  (validation into the Arrow record cache, tokenizing into the sample cache), the lengths the
  ``--group_by_length`` sampler reads, and the first batch of 4 collated (:func:`prepare_data`,
  run from ``--repo``, prints the peak RSS after each stage into the log);
- ``prep (cached)``: the same again, reading both caches back;
- ``train``: the whole ``train.py --max_steps 1`` with the same flags, after the prep rows (so
  with their caches), its peak including the model's training step, not only the data.

"of it anonymous" (prep rows) is the peak of RssAnon sampled every 50 ms: peak RSS also counts
the resident pages of the memory-mapped Arrow caches, page cache that the kernel reclaims under
memory pressure, while anonymous memory is what the process itself holds. Logs of each command
go to ``OUT/logs/<name>.log``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import resource
import shutil
import sys
import threading
from pathlib import Path

from bench.big_records import measure, write_data

ROOT = Path(__file__).resolve().parents[1]
BUILD_CONFIG = """\
image_root: {folder}
output: {folder}/built.json
seed: 0
shuffle: true
check_images: true
sources:
  - {{name: big, format: llava, path: {data}}}
"""


def _tiny_models(folder: Path) -> tuple[Path, Path]:
    """The demo's tiny random LLM and tower (real Qwen tokenizer), written once."""
    from demo.tiny_models import save_tiny_clip, save_tiny_qwen

    qwen, clip = folder / "tiny-qwen", folder / "tiny-clip"
    if not (qwen / "config.json").is_file():
        save_tiny_qwen(qwen)
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip)
    return qwen, clip


def _train_flags(folder: Path, data: Path, qwen: Path, clip: Path, run: Path) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--language_model", str(qwen), "--vision_model", str(clip),
        "--data_path", str(data), "--image_folder", str(folder),
        "--output_dir", str(run), "--overwrite_output_dir",
        "--model_max_length", "2048", "--group_by_length",
        "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--save_steps", "1000", "--report_to", "none", "--dataloader_num_workers", "0",
    ]  # fmt: skip


def commands(folder: Path, data: Path) -> dict[str, list[str]]:
    """The measured commands by row name, in the order they must run (first load, then cached)."""
    config = folder / "build.yaml"
    config.write_text(BUILD_CONFIG.format(folder=folder, data=data), encoding="utf-8")
    qwen, clip = _tiny_models(folder)
    flags = _train_flags(folder, data, qwen, clip, folder / "run")
    prep = [sys.executable, "-c", PREPARE, *flags]
    return {
        "build": [sys.executable, "-m", "dataprocess", "build", "--config", str(config)],
        "prep (first load)": prep,
        "prep (cached)": prep,
        "train": [sys.executable, str(ROOT / "train.py"), *flags],
    }


class _AnonymousPeak(threading.Thread):
    """Samples RssAnon every 50 ms: the part of RSS that is the process's own memory, not pages
    of memory-mapped files (the Arrow caches), which the kernel drops under pressure."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0.0
        self.stop = threading.Event()

    def sample(self) -> float:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))
        self.peak_mib = max(self.peak_mib, kib / 1024)
        return self.peak_mib

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()


def _stage(name: str, anonymous: _AnonymousPeak) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"after {name}: peak RSS {peak:,.0f} MiB, {ANON} {anonymous.sample():,.0f} MiB", flush=True
    )


def prepare_data(argv: list[str]) -> None:
    """train.py up to its first training step: flags, model, datasets, the lengths the
    length-grouped sampler reads, the first batch collated (the Trainer itself is not built)."""
    import train
    from runtime.data import build_datasets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    anonymous = _AnonymousPeak()
    anonymous.start()
    stage = functools.partial(_stage, anonymous=anonymous)
    try:
        config = train.parse_args(argv)
        stage("imports")
        vlm, tokenizer = train.build_model(config)
        stage("model")
        dataset, _, collator = build_datasets(config.data, vlm, tokenizer)
        stage("build_datasets")
        lengths = dataset.lengths
        stage(f"lengths ({len(lengths):,})")
        batch = collator([dataset[i] for i in range(config.training.per_device_train_batch_size)])
        stage(f"first batch {tuple(batch['input_ids'].shape)}")
    finally:
        anonymous.stop.set()


ANON = "peak anonymous"
PREPARE = "import sys; from bench.big_pipeline import prepare_data; prepare_data(sys.argv[1:])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and images")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--repo", type=Path, default=ROOT, help="code to measure")
    parser.add_argument("--skip", nargs="*", default=[], help="skip 'build', 'prep', 'train'")
    args = parser.parse_args()
    folder, json_path, _ = write_data(args.out, args.count)
    folder = folder.resolve()
    cache = folder / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first train row must find no cache
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    size = json_path.stat().st_size / 2**20
    print(f"{args.count:,} records, {json_path.name} {size:,.0f} MiB")
    print("| command | wall | per 100K records | peak RSS | of it anonymous | exit |")
    print("|---|---|---|---|---|---|")
    for name, command in commands(folder, json_path.resolve()).items():
        if name.split()[0] in args.skip:
            continue
        log = logs / (re.sub(r"\W+", "_", name).strip("_") + ".log")
        got = measure(command, args.repo, env=env, log=log)
        per = got["wall_s"] * 100_000 / args.count
        print(
            f"| {name} | {got['wall_s']:.1f} s | {per:.1f} s | {got['max_rss_mib']:,.0f} MiB "
            f"| {_anonymous(log)} | {got['rc']} |",
            flush=True,
        )


def _anonymous(log: Path) -> str:
    """The last sampled anonymous peak a prep row printed, or "-"."""
    found = re.findall(ANON + r" ([\d,]+) MiB", log.read_text(encoding="utf-8", errors="replace"))
    return f"{found[-1]} MiB" if found else "-"


if __name__ == "__main__":
    main()
