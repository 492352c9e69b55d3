"""Evaluation throughput: our batched generation against transformers' LLaVA `generate`.

python -m bench.eval_throughput --questions 32 --batch_sizes 1 8 16 --max_new_tokens 16
python -m bench.eval_throughput --scale qwen0.5b-clipb16 --questions 8 --batch_sizes 1 8 \
    --no-answer_batch

A tiny random VLM of the demo's size (`demo.tiny_models`: QWen of width 64 with the real
151,936-token vocabulary, the tiny CLIP tower) built as the tests build it (`build_vlm`), and a
stock `LlavaForConditionalGeneration` holding the same weights (runtime/export/llava.py, or
bench/reference_llava.py before it moved). Benchmark-style questions (an image and a
multiple-choice prompt of mixed length) are rendered once by `InferenceSession.prompt_ids` and
left-padded per batch; for every batch, our `VisionLanguageModel.generate` and LLaVA's `generate`
run on the same tensors (greedy, KV cache, the chat stop ids), alternating which goes first, for
`--rounds` rounds. Equal weights and greedy decoding give equal tokens (checked and reported), so
both do the same work. Reported per batch size: questions/s and generated tokens/s of both, the
median paired time ratio ours/reference (<= 1.0: ours is at least as fast), the median time to the
first token of both (a separate paired `max_new_tokens=1` call: prefill and one step), and our
end-to-end `answer_batch` rate (tokenising, image preprocessing and decoding included).

`--scale NAME` replaces the demo's models by a bench.models preset with random weights (e.g.
`qwen0.5b-clipb16`: Qwen2-0.5B's dimensions through `inputs_embeds`, CLIP-B/16; `--layers` cuts
its depth), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dataset.conversation import chat_stop_token_ids
from demo.tiny_models import DEMO_QWEN, save_tiny_clip, save_tiny_qwen
from model.builder import build_vlm
from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig
from runtime.inference import GenerationSettings, InferenceSession


def reference_builder():
    """The LLaVA conversion, wherever it lives now."""
    try:
        from runtime.export.llava import build_llava

        return build_llava
    except ImportError:
        from bench.reference_llava import build_reference_llava

        return build_reference_llava


def build_models(directory: Path, seed: int = 0):
    """Our tiny VLM in an InferenceSession, and LLaVA with the same weights (both eval, fp32)."""
    qwen_dir = save_tiny_qwen(directory / "qwen", seed=seed, **DEMO_QWEN)
    clip_dir = save_tiny_clip(directory / "clip", seed=seed)
    torch.manual_seed(seed)
    language = LanguageModelConfig(language_model=str(qwen_dir), dtype="float32")
    vlm, tokenizer = build_vlm(
        language, VisionConfig(vision_model=str(clip_dir)), ProjectorConfig()
    )
    vlm.eval()
    llava = reference_builder()(vlm).eval()
    return InferenceSession(vlm, tokenizer), llava


def build_preset_models(scale: str, layers: int | None, seed: int = 0):
    """A bench.models preset's random-weight VLM in an InferenceSession, and LLaVA beside it."""
    from bench.models import build_ours
    from bench.presets import PRESETS
    from qwen import QWenTokenizer

    preset = PRESETS[scale] if layers is None else PRESETS[scale].with_layers(layers)
    vlm = build_ours(preset, device="cpu", dtype=torch.float32, seed=seed).eval()
    llava = reference_builder()(vlm).eval()
    return InferenceSession(vlm, QWenTokenizer()), llava


def make_questions(count: int, seed: int = 0) -> list[tuple[tuple, tuple, list]]:
    """(roles, contents, images) of benchmark-like questions: one image, 0-6 sentences of hint."""
    generator = torch.Generator().manual_seed(seed)
    hint = "The picture shows a coloured shape on a plain background. "
    questions = []
    for i in range(count):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
        image = Image.new("RGB", (32, 32), colour)
        sentences = int(torch.randint(0, 7, (1,), generator=generator))
        text = (f"<image>\n{hint * sentences}Question {i}: what colour is the shape?\n"
                "A. red\nB. green\nC. blue\nD. yellow\n"
                "Answer with the option's letter from the given choices directly.")  # fmt: skip
        questions.append((("user",), (text,), [image]))
    return questions


def generated_tokens(new_ids: torch.Tensor, stops: set[int]) -> int:
    """Tokens up to and including each row's first stop id (rows are padded after it)."""
    total = 0
    for row in new_ids.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        total += end
    return total


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    output = function(*args, **kwargs)
    return time.perf_counter() - start, output


def generate_ours(session, inputs: dict, kwargs: dict) -> torch.Tensor:
    return session.vlm.generate(**inputs, **kwargs)  # [B, new]


def generate_reference(llava, inputs: dict, kwargs: dict) -> torch.Tensor:
    output = llava.generate(**inputs, **kwargs)  # [B, T + new]
    return output[:, inputs["input_ids"].shape[1] :]


def batch_inputs(session, batch: list) -> dict:
    """The tensors both implementations get: left-padded prompts and the batch's images."""
    prompts = [session.prompt_ids(roles, contents) for roles, contents, _ in batch]
    input_ids, attention_mask = session.left_padded(prompts)  # [B, T] each
    images = [image for *_, images in batch for image in images]
    pixel_values = session.vlm.vision.preprocess(images)  # [n_img, 3, H, W]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def run_batch_size(
    session,
    llava,
    questions,
    batch_size: int,
    max_new_tokens: int,
    rounds: int = 1,
    answer_batch: bool = True,
) -> dict:
    """Every question `rounds` times through each implementation, in batches; paired per batch."""
    tokenizer = session.tokenizer
    stops = chat_stop_token_ids(tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                  eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    impls = {"ours": (generate_ours, session), "reference": (generate_reference, llava)}
    times = {"ours": 0.0, "reference": 0.0, "answer_batch": 0.0}
    tokens = {"ours": 0, "reference": 0}
    ratios, same, first_token = [], True, {"ours": [], "reference": []}
    starts = [s for _ in range(rounds) for s in range(0, len(questions), batch_size)]
    for number, start in enumerate(starts):
        batch = questions[start : start + batch_size]
        inputs = batch_inputs(session, batch)
        seconds, outputs = {}, {}
        # Alternate which runs first, so neither always inherits a warm (or cold) cache.
        for impl in ("ours", "reference") if number % 2 == 0 else ("reference", "ours"):
            function, model = impls[impl]
            with torch.inference_mode():
                seconds[impl], outputs[impl] = _timed(function, model, inputs, kwargs)
            times[impl] += seconds[impl]
            tokens[impl] += generated_tokens(outputs[impl], set(stops))
        same = same and torch.equal(outputs["ours"], outputs["reference"])
        ratios.append(seconds["ours"] / seconds["reference"])
        for impl in ("reference", "ours") if number % 2 == 0 else ("ours", "reference"):
            function, model = impls[impl]
            with torch.inference_mode():
                prefill = _timed(function, model, inputs, {**kwargs, "max_new_tokens": 1})[0]
            first_token[impl].append(prefill)
        if not answer_batch:
            continue
        conversations = [(roles, contents) for roles, contents, _ in batch]
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        images = [images for *_, images in batch]
        times["answer_batch"] += _timed(session.answer_batch, conversations, images, settings)[0]
    count = len(questions) * rounds
    return {
        "batch_size": batch_size,
        "ours_questions_per_s": count / times["ours"],
        "reference_questions_per_s": count / times["reference"],
        "ours_tokens_per_s": tokens["ours"] / times["ours"],
        "reference_tokens_per_s": tokens["reference"] / times["reference"],
        "median_paired_ratio": statistics.median(ratios),
        "same_tokens": same,
        "ours_first_token_s": statistics.median(first_token["ours"]),
        "reference_first_token_s": statistics.median(first_token["reference"]),
        "answer_batch_questions_per_s": count / times["answer_batch"] if answer_batch else None,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| batch | ours q/s | LLaVA q/s | ours tok/s | LLaVA tok/s | median ratio ours/LLaVA "
        "| same tokens | ours `answer_batch` q/s | time to first token ours / LLaVA (s) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        answer = r["answer_batch_questions_per_s"]
        lines.append(
            f"| {r['batch_size']} | {r['ours_questions_per_s']:.2f} | "
            f"{r['reference_questions_per_s']:.2f} | {r['ours_tokens_per_s']:.0f} | "
            f"{r['reference_tokens_per_s']:.0f} | {r['median_paired_ratio']:.3f} | "
            f"{'yes' if r['same_tokens'] else 'no'} | "
            f"{'-' if answer is None else f'{answer:.2f}'} | "
            f"{r['ours_first_token_s']:.3f} / {r['reference_first_token_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32, help="questions per batch size")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the questions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default=None, help="a bench.models preset (default: the demo)")
    parser.add_argument("--layers", type=int, default=None, help="--scale's LLM depth")
    parser.add_argument(
        "--answer_batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time our end-to-end answer_batch",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale is not None:
        session, llava = build_preset_models(args.scale, args.layers, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
            session, llava = build_models(Path(tmp), args.seed)
    questions = make_questions(args.questions, args.seed)
    run_batch_size(session, llava, questions[:2], 2, 2, answer_batch=False)  # warm-up, untimed
    rows = [run_batch_size(session, llava, questions, size, args.max_new_tokens, args.rounds,
                           args.answer_batch)
            for size in args.batch_sizes]  # fmt: skip
    print(markdown_table(rows), end="")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
