"""The command line of `python -m runtime.evaluation`: run or score a benchmark, compare runs.

    python -m runtime.evaluation --benchmark pope --data pope/coco --image_folder val2014 \
        --model_weights outputs/run --output_dir eval/pope
    python -m runtime.evaluation --benchmark pope --data pope/coco --image_folder val2014 \
        --answers answers.jsonl --output_dir eval/pope-theirs      # score answers, no model
    python -m runtime.evaluation compare eval/run-a eval/run-b
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

logger = logging.getLogger("runtime.evaluation")

LANGUAGES = ("auto", "en", "zh")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from model.config import DTYPE_NAMES
    from runtime.cli import add_checkpoint_flags
    from runtime.evaluation.registry import BENCHMARKS
    from runtime.evaluation.runner import EVALUATION_BATCH_SIZE
    from runtime.inference import GenerationSettings

    p = argparse.ArgumentParser(
        prog="python -m runtime.evaluation",
        description="Evaluate a trained VLM on a benchmark (or score an answers file). "
        "`python -m runtime.evaluation compare RUN_DIR ...` tabulates several runs.",
    )
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    p.add_argument(
        "--data", required=True, help="the benchmark's file or folder (docs/EVALUATION.md)"
    )
    p.add_argument("--image_folder", help="image root (POPE: COCO val2014; see docs/EVALUATION.md)")
    p.add_argument("--output_dir", required=True, help="answers.jsonl, run.json, report.json/.md")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_weights", "--checkpoint", help="training output dir to evaluate")
    source.add_argument("--answers", help="score this JSONL of {question_id, answer}; no model")
    p.add_argument("--batch_size", type=int, default=EVALUATION_BATCH_SIZE,
                   help="questions per generate call")  # fmt: skip
    p.add_argument("--limit", type=int, help="only the first N questions (MME images, MMBench "
                   "questions with all their rotations)")  # fmt: skip
    p.add_argument("--lang", default="auto", choices=LANGUAGES,
                   help="multiple-choice instruction language (auto: Chinese for Chinese text)")  # fmt: skip
    p.add_argument("--split", default="test", help="ScienceQA split of pid_splits.json")
    p.add_argument("--no_rotation", action="store_true",
                   help="MMBench: do not add circular rotations to a TSV that has none")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="discard the answers of a different earlier run in --output_dir")  # fmt: skip
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--skip_bad_questions", action="store_true",
                   help="skip (and count) questions whose image is missing or does not decode, "
                        "or that have fewer than two options, instead of stopping")  # fmt: skip
    add_checkpoint_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--system_prompt", help="default: the one recorded at training time")
    GenerationSettings.add_flags(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: must be at least 1")
    return args


def load_questions(args: argparse.Namespace) -> tuple[list, list[dict]]:
    """The benchmark's questions (the first `--limit` groups of them) that can be asked, and the
    skipped ones ({question_id, problem}; empty unless --skip_bad_questions)."""
    from runtime.evaluation.questions import limit_groups, screen_questions
    from runtime.evaluation.registry import BENCHMARKS

    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    folder = Path(args.image_folder) if args.image_folder else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--image_folder {folder}: no such directory")
    benchmark = BENCHMARKS[args.benchmark]
    questions = benchmark.load(data, folder, args)
    if not questions:
        raise ValueError(f"--data {data}: no questions found")
    questions, skipped = screen_questions(
        limit_groups(questions, args.limit),
        f"{args.benchmark} {data}",
        multiple_choice=benchmark.multiple_choice,
        skip=args.skip_bad_questions,
    )
    if skipped:
        logger.warning("skipped %d question(s) that cannot be asked or scored, e.g. %s",
                       len(skipped), skipped[0])  # fmt: skip
    return questions, skipped


def describe_run(args: argparse.Namespace, settings) -> dict:
    """What the answers depend on (not --limit or --batch_size: greedy answers do not change):
    paths, and the content of the model and the data (retrained or edited at the same path)."""
    from identity.fingerprint import path_fingerprint
    from model.checkpoint import checkpoint_fingerprint

    def absolute(path):
        return str(Path(path).resolve()) if path else None

    return {
        "benchmark": args.benchmark,
        "data": absolute(args.data),
        "data_content": path_fingerprint(args.data),
        "model_content": checkpoint_fingerprint(args.model_weights) if args.model_weights else None,
        "image_folder": absolute(args.image_folder),
        "model_weights": absolute(args.model_weights),
        "answers_file": absolute(args.answers),
        "language_model": args.language_model,
        "vision_model": args.vision_model,
        "dtype": args.dtype,
        "system_prompt": args.system_prompt,
        "lang": args.lang,
        "split": args.split,
        "rotation": not args.no_rotation,
        "generation": dataclasses.asdict(settings),
    }


def evaluate(args: argparse.Namespace, session=None) -> dict:
    """Load, answer (unless --answers), score, write the reports; returns report.json's dict.
    `session` replaces loading --model_weights (tests, or a caller holding a model)."""
    from runtime.cli import checkpoint_overrides
    from runtime.evaluation.report import write_report
    from runtime.evaluation.runner import answer_questions, check_run, read_answers
    from runtime.evaluation.scoring import check_answer_ids, score
    from runtime.inference import GenerationSettings, InferenceSession, check_system_prompt

    settings = GenerationSettings.from_args(args)
    if args.system_prompt is not None:
        check_system_prompt(args.system_prompt)
    questions, skipped = load_questions(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir}: exists and is not a directory")
    if args.answers and not Path(args.answers).is_file():
        raise FileNotFoundError(f"--answers {args.answers}: no such file")
    description = describe_run(args, settings)
    if args.answers:  # checked before run.json is written: a refused file leaves nothing behind
        answers = read_answers(Path(args.answers))
        check_answer_ids(questions, answers, args.answers)
    check_run(output_dir, description, overwrite=args.overwrite)
    if not args.answers:
        if session is None:
            session = InferenceSession.from_checkpoint(
                args.model_weights, system_prompt=args.system_prompt, settings=settings,
                dtype=args.dtype, **checkpoint_overrides(args),
            )  # fmt: skip
        answers = answer_questions(
            session, questions, output_dir, args.batch_size, progress=not args.no_progress
        )
    report = {key: description[key] for key in ("benchmark", "data", "image_folder")}
    report["model_weights" if args.model_weights else "answers_file"] = (
        description["model_weights"] or description["answers_file"]
    )
    report.update(score(args.benchmark, questions, answers))
    report["skipped"] = skipped
    write_report(output_dir, report)
    return report


def compare(argv: list[str]) -> str:
    from runtime.evaluation.report import compare_runs
    from runtime.outputs import write_text_atomic

    p = argparse.ArgumentParser(prog="python -m runtime.evaluation compare",
                                description="Put evaluation runs side by side (markdown).")  # fmt: skip
    p.add_argument("run_dirs", nargs="+", help="--output_dir of earlier evaluations")
    p.add_argument("--output", help="also write the table to this file")
    args = p.parse_args(argv)
    table = compare_runs([Path(d) for d in args.run_dirs])
    if args.output:
        write_text_atomic(args.output, table)
    return table


def main(argv: list[str] | None = None) -> dict | str:
    from runtime.cli import silence_known_warnings

    silence_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        table = compare(argv[1:])
        print(table, end="")
        return table
    args = parse_args(argv)
    report = evaluate(args)
    counts = report["counts"]
    scores = ", ".join(f"{name} {value:.2f}" for name, value in report["scores"].items())
    print(f"{report['benchmark']}: {scores or report.get('note', 'no scores')} "
          f"({counts['answered']}/{counts['questions']} answered, {counts['unparsed']} unparsed)")  # fmt: skip
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return report


def run() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # this package's own messages (resuming, ...)
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line
        logger.error("%s", error)
        sys.exit(2)
