"""The benchmarks, each named once: how its questions load, how they score, whether they are
multiple choice. `--benchmark`'s choices, `cli.load_questions` and `scoring.score` read this."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.evaluation import loaders, scoring
from runtime.evaluation.mmbench import load_mmbench, score_mmbench
from runtime.evaluation.questions import Question


@dataclass(frozen=True)
class Benchmark:
    # (data file or folder, --image_folder or None, the parsed flags) -> questions
    load: Callable[[Path, Path | None, argparse.Namespace], list[Question]]
    score: Callable[[list[Question], dict[str, str]], dict]
    multiple_choice: bool = False  # a question needs two or more options


BENCHMARKS: dict[str, Benchmark] = {
    "mme": Benchmark(lambda data, folder, args: loaders.load_mme(data), scoring.score_mme),
    "pope": Benchmark(
        lambda data, folder, args: loaders.load_pope(data, folder), scoring.score_pope
    ),
    "mmbench": Benchmark(
        lambda data, folder, args: load_mmbench(data, args.lang, rotate=not args.no_rotation),
        score_mmbench,
        multiple_choice=True,
    ),
    "scienceqa": Benchmark(
        lambda data, folder, args: loaders.load_scienceqa(data, folder, args.split),
        scoring.score_scienceqa,
        multiple_choice=True,
    ),
    "textvqa": Benchmark(
        lambda data, folder, args: loaders.load_textvqa(data, folder), scoring.score_textvqa
    ),
    "records": Benchmark(
        lambda data, folder, args: loaders.load_records(data, folder), scoring.score_records
    ),
}
