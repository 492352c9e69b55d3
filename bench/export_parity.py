"""Exported LLaVA against our inference session: the same answers to the demo's held-out records?

python -m bench.export_parity [--checkpoint outputs/demo] [--data_path demo_assets/shapes/test.json]
    [--image_folder demo_assets/shapes] [--dtype float32] [--output_file parity.json]

The checkpoint is exported (`runtime.export`, into a temporary directory unless `--export_dir`),
then every record is answered greedily twice, one record at a time: by transformers alone
(`AutoProcessor` + `LlavaForConditionalGeneration.generate`, the records' earlier turns as
history through the exported chat template, the last user turn asked) and by our
`InferenceSession.answer`. Reported: exact match of both against the references, how many
answers are identical, and the wall time of both (loading and answering).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from dataprocess.reading import iter_raw_records
from dataprocess.schema import confined_image_path, parse_record
from runtime.evaluation.scoring import exact_match
from runtime.export import export_checkpoint
from runtime.inference import GenerationSettings, InferenceSession

logger = logging.getLogger(__name__)


def load_records(data_path: Path, image_folder: Path, limit: int | None) -> list[dict]:
    """(system, roles, contents, images, reference) per record: the last turn is the reference."""
    records = []
    for index, raw in iter_raw_records(data_path):
        record = parse_record(raw, source=str(data_path), index=index)
        turns = [t for t in record.turns if t.role != "system"]
        records.append({
            "id": record.id,
            "system": next((t.content for t in record.turns if t.role == "system"), None),
            "roles": [t.role for t in turns[:-1]],
            "contents": [t.content for t in turns[:-1]],
            "images": [confined_image_path(image_folder, name) for name in record.images],
            "reference": turns[-1].content,
        })  # fmt: skip
        if limit and len(records) == limit:
            break
    return records


def answer_with_transformers(export_dir: Path, records: list[dict], dtype: str, max_new: int):
    """Answers from the exported directory, with transformers alone; returns (answers, times)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from visual import load_image  # the pixels our own session sees

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(export_dir, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=getattr(torch, dtype))
    model.eval()
    loaded = time.perf_counter()
    answers = []
    for record in records:
        messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
        messages += [
            {"role": role, "content": content}  # "<image>" in a string: the placeholder
            for role, content in zip(record["roles"], record["contents"], strict=True)
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [load_image(path) for path in record["images"]] or None
        inputs = processor(images=images, text=text, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.decode(new, skip_special_tokens=True).strip())
    return answers, {"load_s": loaded - start, "answer_s": time.perf_counter() - loaded}


def answer_with_session(checkpoint: Path, records: list[dict], dtype: str, max_new: int):
    """Answers from our InferenceSession; returns (answers, times)."""
    start = time.perf_counter()
    settings = GenerationSettings(max_new_tokens=max_new)
    session = InferenceSession.from_checkpoint(checkpoint, settings=settings, dtype=dtype)
    loaded = time.perf_counter()
    answers = [
        session.answer(r["roles"], r["contents"], r["images"], system_prompt=r["system"])
        for r in records
    ]
    return answers, {"load_s": loaded - start, "answer_s": time.perf_counter() - loaded}


def compare(records: list[dict], ours: list[str], theirs: list[str], name="transformers") -> dict:
    """Exact match of both, identical answers, and the records answered differently."""
    n = len(records)
    ours_ok = sum(exact_match(a, r["reference"]) for a, r in zip(ours, records, strict=True))
    theirs_ok = sum(exact_match(a, r["reference"]) for a, r in zip(theirs, records, strict=True))
    differing = [
        {"id": r["id"], "ours": a, name: b, "reference": r["reference"]}
        for r, a, b in zip(records, ours, theirs, strict=True)
        if a != b
    ]
    return {
        "records": n,
        "exact_match_ours": ours_ok / n,
        f"exact_match_{name}": theirs_ok / n,
        "identical_answers": n - len(differing),
        "differing": differing,
    }


def run(args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoint)
    records = load_records(Path(args.data_path), Path(args.image_folder), args.limit)
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = Path(args.export_dir or Path(scratch) / "llava")
        start = time.perf_counter()
        if not args.export_dir or not export_dir.exists():
            export_checkpoint(checkpoint, export_dir, dtype=args.dtype)
        export_s = time.perf_counter() - start
        theirs, their_times = answer_with_transformers(
            export_dir, records, args.dtype, args.max_new_tokens
        )
    ours, our_times = answer_with_session(checkpoint, records, args.dtype, args.max_new_tokens)
    report = compare(records, ours, theirs)
    report.update(checkpoint=str(checkpoint), dtype=args.dtype, export_s=export_s,
                  transformers=their_times, ours=our_times)  # fmt: skip
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/demo")
    parser.add_argument("--data_path", default="demo_assets/shapes/test.json")
    parser.add_argument("--image_folder", default="demo_assets/shapes")
    parser.add_argument("--export_dir", help="reuse (or keep) the export here; default: temporary")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max_new_tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--limit", type=int, help="answer only the first N records")
    parser.add_argument("--output_file", help="where the JSON report is written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run(args)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(report, ensure_ascii=False, indent=1))
    n = report["records"]
    print(f"records: {n}, identical answers: {report['identical_answers']}/{n}")
    for name, key in (("ours", "ours"), ("transformers", "transformers")):
        times = report[key]
        print(f"{name:>12}: exact match {report[f'exact_match_{key}']:.1%}, "
              f"load {times['load_s']:.1f} s, answers {times['answer_s']:.1f} s")  # fmt: skip
    print(f"export: {report['export_s']:.1f} s")
    return report


if __name__ == "__main__":
    main()
