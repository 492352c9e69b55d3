"""CPU speed at batch 1: llama.cpp on the GGUF export against our InferenceSession, same weights.

python -m bench.gguf_speed [--checkpoint outputs/demo] [--outtype f32 f16 q8_0] [--records 5]
    [--new_tokens 32] [--threads 2]

For the first `--records` held-out demo records (an image, and history where the record has it),
both engines prefill the prompt and decode exactly `--new_tokens` greedy tokens (stop tokens
ignored, so both decode the same number). Time to first token is the prefill (image encoding
included) plus the first token's choice; generation speed is (new_tokens - 1) / (the rest of the
time). Medians over the records; both run on `--threads` CPU threads. Ours runs in float32, the
precision it has on a CPU (test.py's default); llama.cpp in each `--outtype`, its f16 KV cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.export_parity import load_records
from runtime.export.gguf_export import OUTTYPES, export_gguf
from runtime.export.llama_cpp_runner import LlamaCppVLM
from runtime.inference import GenerationSettings, InferenceSession
from visual import load_image


def time_llama_cpp(runner: LlamaCppVLM, record: dict, new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, generated tokens/s after it) of one record in llama.cpp."""
    text = runner.prompt_text(record["roles"], record["contents"], record["system"])
    start = time.perf_counter()
    runner.prefill(text, record["images"])
    token = int(np.argmax(runner.last_logits()))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):  # one llama.cpp decode per token, as any chat does
        runner.llama.eval([token])
        token = int(np.argmax(runner.last_logits()))
    return first - start, (new_tokens - 1) / (time.perf_counter() - first)


@torch.no_grad()
def time_ours(session: InferenceSession, record: dict, new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, generated tokens/s after it) of one record in our session."""
    ids = session.prompt_ids(record["roles"], record["contents"], record["system"])
    images = [load_image(path) for path in record["images"]]

    def generate(count: int) -> float:
        start = time.perf_counter()
        pixels = session.vlm.vision.preprocess(images) if images else None
        kwargs = GenerationSettings(max_new_tokens=count).generate_kwargs(session.tokenizer)
        session.vlm.generate(torch.tensor([ids]), pixel_values=pixels, min_new_tokens=count,
                             **kwargs)  # fmt: skip
        return time.perf_counter() - start

    first = generate(1)
    return first, (new_tokens - 1) / (generate(new_tokens) - first)


def summary(times: list[tuple[float, float]]) -> dict:
    return {
        "ttft_ms": 1000 * statistics.median(t for t, _ in times),
        "tokens_per_s": statistics.median(rate for _, rate in times),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    records = load_records(Path(args.data_path), Path(args.image_folder), args.records)
    session = InferenceSession.from_checkpoint(checkpoint, dtype="float32")
    time_ours(session, records[0], 2)  # warm-up
    report = {"ours_float32": summary([time_ours(session, r, args.new_tokens) for r in records])}
    with tempfile.TemporaryDirectory() as scratch:
        for outtype in args.outtype:
            export_dir = export_gguf(checkpoint, Path(scratch) / outtype, outtype=outtype)
            runner = LlamaCppVLM(export_dir, n_threads=args.threads)
            time_llama_cpp(runner, records[0], 2)  # warm-up
            times = [time_llama_cpp(runner, r, args.new_tokens) for r in records]
            report[f"llama_cpp_{outtype}"] = summary(times)
            runner.close()
    report.update(records=len(records), new_tokens=args.new_tokens, threads=args.threads)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/demo")
    parser.add_argument("--data_path", default="demo_assets/shapes/test.json")
    parser.add_argument("--image_folder", default="demo_assets/shapes")
    parser.add_argument("--outtype", nargs="+", default=list(OUTTYPES), choices=OUTTYPES)
    parser.add_argument("--records", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.records < 1:
        parser.error("--new_tokens must be >= 2 and --records >= 1")
    report = run(args)
    print(json.dumps(report, indent=1))
    for name, numbers in report.items():
        if isinstance(numbers, dict):
            print(f"{name:>16}: time to first token {numbers['ttft_ms']:.1f} ms, "
                  f"{numbers['tokens_per_s']:.1f} tokens/s")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
