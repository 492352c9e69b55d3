"""Ask a trained VLM about images (prompt testing), chat with it, or score it on held-out records.

    python test.py --model_weights outputs/demo --image_path img.png --prompt "What colour is it?"
    python test.py --model_weights outputs/demo --image_path img.png --chat      # turns from stdin
    python test.py --model_weights outputs/demo --data_path test.json --image_folder imgs \
        --output_file answers.json                                                # exact match
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prompt-test a trained vision-language model.")
    p.add_argument("--model_weights", "--checkpoint", required=True, help="training output dir")
    p.add_argument("--language_model", "--base_language_model", help="override the base LLM path")
    p.add_argument("--vision_model", "--base_value_model", help="override the vision tower path")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--image_path", help="an image file, or a folder: every image in it")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--chat", action="store_true", help="multi-turn chat, one user turn per line")
    p.add_argument("--data_path", help="held-out records: answer each, report exact match")
    p.add_argument("--image_folder", help="image root for --data_path")
    p.add_argument("--output_file", help="where evaluation answers and the score are written")
    p.add_argument("--system_prompt", help="default: the one recorded at training time")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    return p.parse_args(argv)


def run_prompts(args, vlm, tokenizer, settings, system_prompt) -> None:
    from model.inference import answer, image_files, with_image_marker

    images = image_files(args.image_path) if args.image_path else [None]
    for image in images:
        picture = [image] if image is not None else []
        roles, contents = ["user"], [with_image_marker(args.prompt, len(picture))]
        reply = answer(vlm, tokenizer, roles, contents, picture, settings, system_prompt)
        print(f"{image or '(no image)'}\t{reply}" if args.image_path else reply)
        if not args.chat:
            continue
        for line in sys.stdin:  # each further line is the next user turn about the same image
            roles += ["assistant", "user"]
            contents += [reply, line.rstrip("\n")]
            reply = answer(vlm, tokenizer, roles, contents, picture, settings, system_prompt)
            print(reply, flush=True)


def run_evaluation(args, vlm, tokenizer, settings, system_prompt) -> dict:
    from dataprocess.schema import iter_raw_records, parse_record
    from model.inference import answer, exact_match

    folder = Path(args.image_folder) if args.image_folder else None
    results = []
    for index, raw in iter_raw_records(args.data_path):
        record = parse_record(raw, source=str(args.data_path), index=index)
        turns = [t for t in record.turns if t.role != "system"]
        system = next((t.content for t in record.turns if t.role == "system"), system_prompt)
        images = [(folder or Path(".")) / name for name in record.images]
        reference = turns[-1].content
        roles, contents = [t.role for t in turns[:-1]], [t.content for t in turns[:-1]]
        prediction = answer(vlm, tokenizer, roles, contents, images, settings, system)
        correct = exact_match(prediction, reference)
        results.append({"id": record.id, "prediction": prediction, "reference": reference,
                        "correct": correct})  # fmt: skip
    if not results:
        raise ValueError(f"--data_path {args.data_path}: no records to evaluate")
    accuracy = sum(r["correct"] for r in results) / len(results)
    report = {"data_path": str(args.data_path), "num_records": len(results),
              "exact_match": accuracy, "answers": results}  # fmt: skip
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(report, ensure_ascii=False, indent=1), "utf-8")
    print(f"exact match: {accuracy:.1%} ({sum(r['correct'] for r in results)}/{len(results)})")
    return report


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    from model.checkpoint import load_vlm
    from model.inference import GenerationSettings

    vlm, tokenizer, description = load_vlm(
        args.model_weights,
        language_model=args.language_model,
        vision_model=args.vision_model,
        dtype=args.dtype,
    )
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )
    system_prompt = args.system_prompt or description.get("system_prompt")
    system_prompt = system_prompt or "You are a helpful assistant."
    if args.data_path:
        return run_evaluation(args, vlm, tokenizer, settings, system_prompt)
    run_prompts(args, vlm, tokenizer, settings, system_prompt)
    return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line
        logger.error("%s", error)
        sys.exit(2)
