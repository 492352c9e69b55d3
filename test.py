"""Ask a trained VLM about images (prompt testing), chat with it, or score it on held-out records.

    python test.py --model_weights outputs/demo --image_path img.png --prompt "What colour is it?"
    python test.py --model_weights outputs/demo --image_path img.png --chat      # turns from stdin
    python test.py --model_weights outputs/demo --data_path test.json --image_folder imgs \
        --output_file answers.json                                                # exact match

Every answer goes through `runtime.inference.InferenceSession`: the prompt for each turn is the
whole conversation so far, rendered exactly as training renders it. Held-out records are loaded,
answered and scored by `runtime.evaluation`'s records path (`runtime/evaluation/held_out.py`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger("test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from model.config import DTYPE_NAMES
    from runtime.cli import add_checkpoint_flags
    from runtime.evaluation.runner import EVALUATION_BATCH_SIZE
    from runtime.inference import GenerationSettings

    p = argparse.ArgumentParser(description="Prompt-test a trained vision-language model.")
    p.add_argument("--model_weights", "--checkpoint", required=True, help="training output dir")
    add_checkpoint_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--image_path", help="an image file, or a folder: every image in it")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--chat", action="store_true", help="multi-turn chat, one user turn per line")
    p.add_argument("--data_path", help="held-out records: answer each, report exact match")
    p.add_argument("--image_folder", help="image root for --data_path (default: its folder)")
    p.add_argument("--batch_size", type=int, default=EVALUATION_BATCH_SIZE,
                   help="--data_path: records per generate call (as runtime.evaluation)")  # fmt: skip
    p.add_argument("--allow_outside_image_folder", action="store_true",
                   help="let records name absolute image paths or paths with '..'")  # fmt: skip
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip (and count) records or files whose image does not load")  # fmt: skip
    p.add_argument("--output_file", help="where evaluation answers and the score are written")
    p.add_argument("--system_prompt", help="default: the one recorded at training time")
    p.add_argument("--draw_boxes", metavar="DIR",
                   help="write each answer's <box>es drawn on its image to DIR/<name>.png")  # fmt: skip
    GenerationSettings.add_flags(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    return args


def check_args(args) -> None:
    """Everything that can be checked before the model loads."""
    from runtime.inference import check_system_prompt
    from runtime.outputs import check_output_file

    if args.output_file:
        check_output_file(args.output_file, "--output_file")
    if args.system_prompt is not None:
        check_system_prompt(args.system_prompt)
    if args.data_path and not Path(args.data_path).is_file():
        raise FileNotFoundError(f"--data_path {args.data_path}: no such file")
    if args.draw_boxes and Path(args.draw_boxes).exists() and not Path(args.draw_boxes).is_dir():
        raise ValueError(f"--draw_boxes {args.draw_boxes}: not a directory")
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise FileNotFoundError(f"--image_folder {args.image_folder}: no such directory")
    if not args.data_path and not args.image_path and "<image>" in args.prompt:
        raise ValueError("--prompt contains <image> but no --image_path was given")


def run_prompts(args, session) -> None:
    from runtime.cli import image_files, with_image_marker
    from visual import ImageLoadError

    images = image_files(args.image_path) if args.image_path else [None]
    for image in images:
        picture = [image] if image is not None else []
        roles, contents = ["user"], [with_image_marker(args.prompt, len(picture))]
        try:
            reply = session.answer(roles, contents, picture)
        except ImageLoadError as error:
            if not args.skip_bad_images:
                raise ValueError(f"{error} (pass --skip_bad_images to skip it)") from None
            logger.warning("skipped: %s", error)
            continue
        print(f"{image or '(no image)'}\t{reply}" if args.image_path else reply, flush=True)
        draw_boxes(args, image and Path(image).stem, image, reply)
        if not args.chat:
            continue
        for turn, text in enumerate(follow_ups(sys.stdin), 2):
            roles += ["assistant", "user"]
            contents += [reply, text]
            reply = session.answer(roles, contents, picture)
            print(reply, flush=True)
            draw_boxes(args, image and f"{Path(image).stem}_turn{turn}", image, reply)


def follow_ups(lines):
    """--chat's further user turns, one per line: blank lines are skipped, and a line with an
    `<image>` marker is not sent (images come only from --image_path) - the chat goes on."""
    from dataprocess.schema import IMAGE_MARKER

    for line in lines:
        text = line.strip()
        if IMAGE_MARKER in text:
            logger.warning(
                "not sent: %s in a follow-up; images are given with --image_path", IMAGE_MARKER
            )
        elif text:
            yield text


def draw_boxes(args, name: str | None, image, reply: str) -> None:
    """--draw_boxes: the reply's boxes drawn on the image it is about, as DIR/<name>.png (the web
    chat's drawing, `dataprocess.boxes`); nothing when the reply has no box."""
    if not args.draw_boxes or image is None:
        return
    from dataprocess.boxes import draw_answer_boxes
    from visual import load_image

    drawing = draw_answer_boxes(load_image(image), reply)
    if drawing is not None:
        Path(args.draw_boxes).mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.-]", "_", name)  # a record id may hold "/"
        drawing.save(Path(args.draw_boxes) / f"{safe}.png")


def run_evaluation(args, session) -> dict:
    """Answer every record's last user turn (the earlier turns as history), score exact match:
    the evaluator's records path (`runtime.evaluation.held_out`), the same score as
    `python -m runtime.evaluation --benchmark records` gives."""
    from runtime.evaluation.held_out import evaluate_held_out
    from visual import ImageLoadError

    def on_answer(question, reply: str) -> None:
        draw_boxes(args, question.question_id, question.images[-1] if question.images else None,
                   reply)  # fmt: skip

    try:
        report = evaluate_held_out(
            session, Path(args.data_path),
            Path(args.image_folder) if args.image_folder else None,
            batch_size=args.batch_size, allow_outside=args.allow_outside_image_folder,
            skip_bad_images=args.skip_bad_images, output_file=args.output_file,
            on_answer=on_answer,
        )  # fmt: skip
    except ImageLoadError as error:
        raise ValueError(f"--data_path {args.data_path}: {error} (pass --skip_bad_images to "
                         "skip it)") from None  # fmt: skip
    correct = sum(answer["correct"] for answer in report["answers"])
    skipped = report["skipped"]
    print(f"exact match: {report['exact_match']:.1%} ({correct}/{report['num_records']})"
          + (f", {len(skipped)} skipped" if skipped else ""))  # fmt: skip
    if len(report["exact_match_by_turns"]) > 1:
        groups = report["exact_match_by_turns"].items()
        print("by questions asked: " + ", ".join(f"{n}: {acc:.1%}" for n, acc in groups))
    return report


def main(argv: list[str] | None = None) -> dict | None:
    from runtime.cli import checkpoint_overrides, silence_known_warnings

    silence_known_warnings()
    args = parse_args(argv)
    from runtime.inference import GenerationSettings, InferenceSession

    settings = GenerationSettings.from_args(args)
    check_args(args)
    session = InferenceSession.from_checkpoint(
        args.model_weights,
        system_prompt=args.system_prompt,
        settings=settings,
        dtype=args.dtype,
        **checkpoint_overrides(args),
    )
    if args.data_path:
        return run_evaluation(args, session)
    run_prompts(args, session)
    return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line
        logger.error("%s", error)
        sys.exit(2)
