"""GGUF export in llama.cpp against our inference session: the same answers to held-out records?

python -m bench.gguf_parity [--checkpoint outputs/demo] [--data_path demo_assets/shapes/test.json]
    [--image_folder demo_assets/shapes] [--outtype f32] [--limit N] [--output_file parity.json]

The checkpoint is exported (`runtime.export --format gguf`, into a temporary directory unless
`--export_dir`), then every record's last user turn is answered greedily, with its earlier turns
as history: by llama.cpp (llama-cpp-python + mtmd, `runtime.export.llama_cpp_runner`, its default
f16 KV cache) and by our `InferenceSession.answer` (float32). Reported: exact match of both against
the references, how many answers are identical, and the records answered differently.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.export_parity import answer_with_session, compare, load_records
from runtime.export.gguf_export import OUTTYPES, export_gguf
from runtime.export.llama_cpp_runner import LlamaCppVLM
from runtime.inference import GenerationSettings


def answer_with_llama_cpp(export_dir: Path, records: list[dict], max_new: int, threads: int = 2):
    """Answers from the GGUF files run by llama.cpp; returns (answers, times)."""
    start = time.perf_counter()
    runner = LlamaCppVLM(export_dir, n_threads=threads)
    loaded = time.perf_counter()
    answers = [
        runner.answer(
            r["roles"],
            r["contents"],
            r["images"],
            system_prompt=r["system"],
            max_new_tokens=max_new,
        )  # fmt: skip
        for r in records
    ]
    runner.close()
    return answers, {"load_s": loaded - start, "answer_s": time.perf_counter() - loaded}


def run(checkpoint: Path, records: list[dict], *, outtype="f32", export_dir=None, max_new=32):
    """Export (unless `export_dir` exists), answer with both, compare."""
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = Path(export_dir or Path(scratch) / "gguf")
        start = time.perf_counter()
        if not export_dir.exists():
            export_gguf(checkpoint, export_dir, outtype=outtype)
        export_s = time.perf_counter() - start
        theirs, their_times = answer_with_llama_cpp(export_dir, records, max_new)
    ours, our_times = answer_with_session(checkpoint, records, "float32", max_new)
    report = compare(records, ours, theirs, name="llama_cpp")
    report.update(checkpoint=str(checkpoint), outtype=outtype, export_s=export_s,
                  llama_cpp=their_times, ours=our_times)  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/demo")
    parser.add_argument("--data_path", default="demo_assets/shapes/test.json")
    parser.add_argument("--image_folder", default="demo_assets/shapes")
    parser.add_argument("--export_dir", help="reuse (or keep) the export here; default: temporary")
    parser.add_argument("--outtype", default="f32", choices=OUTTYPES)
    parser.add_argument("--max_new_tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--limit", type=int, help="answer only the first N records")
    parser.add_argument("--output_file", help="where the JSON report is written")
    args = parser.parse_args(argv)
    records = load_records(Path(args.data_path), Path(args.image_folder), args.limit)
    report = run(Path(args.checkpoint), records, outtype=args.outtype,
                 export_dir=args.export_dir, max_new=args.max_new_tokens)  # fmt: skip
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(report, ensure_ascii=False, indent=1))
    n = report["records"]
    print(f"records: {n}, identical answers: {report['identical_answers']}/{n}")
    for key in ("ours", "llama_cpp"):
        times = report[key]
        print(f"{key:>10}: exact match {report[f'exact_match_{key}']:.1%}, "
              f"load {times['load_s']:.1f} s, answers {times['answer_s']:.1f} s")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
