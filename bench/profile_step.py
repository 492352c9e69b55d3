"""Where a training step's time goes: `torch.profiler` over one step of a benchmark preset.

python -m bench.profile_step --scale qwen0.5b-clipb16-native --layers 2 --impl ours

Builds the models exactly as `bench.train_step` does (bench/models.py::prepare_models, the same
synthetic batch), runs one untimed step, then profiles the next and prints the operators with the
most self CPU time (the table docs/PERFORMANCE.md quotes). `--layers` cuts the LLM's depth so a
profile at real width takes seconds, not minutes; per-layer operators scale with it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.batches import synthetic_batches
from bench.measure import make_optimizer, train_step
from bench.models import add_gradient_checkpointing_flag, prepare_models
from bench.presets import PRESETS
from model.config import LoraSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(PRESETS), default="qwen0.5b-clipb16-native")
    parser.add_argument("--impl", choices=["ours", "reference"], default="ours")
    parser.add_argument("--layers", type=int, default=None, help="LLM blocks (default: scale's)")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    add_gradient_checkpointing_flag(parser)
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    return parser.parse_args(argv)


def profile_step(args: argparse.Namespace) -> str:
    """The profiler's table for one step (after one warm-up step) of `args.impl`."""
    preset = PRESETS[args.scale]
    if args.layers is not None:
        preset = preset.with_layers(args.layers)
    lora = LoraSettings(
        lora_rank=args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=preset.lora_targets or LoraSettings.target_modules,
    )
    models, vlm = prepare_models(
        preset,
        mode="lora",
        impls=[args.impl],
        device="cpu",
        dtype=torch.float32,
        lora=lora,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = models[args.impl]
    batch = synthetic_batches(
        1,
        preset.batch_size,
        num_image_tokens=vlm.num_image_tokens,
        image_size=vlm.vision.image_size,
        max_length=preset.max_length,
        image_token_id=vlm.image_token_id,
        seed=0,
        full_length=preset.full_length,
        supervised_fraction=preset.supervised_fraction,
    )[0]
    optimizer = make_optimizer(model, 2e-4)
    warm = train_step(model, optimizer, batch, None)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step = train_step(model, optimizer, batch, None)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    header = (
        f"{args.impl}, scale {args.scale}, LLM layers {args.layers or 'all'}, "
        f"gradient checkpointing {args.gradient_checkpointing}, "
        f"step {step.seconds:.2f} s profiled (warm-up {warm.seconds:.2f} s), "
        f"{torch.get_num_threads()} threads"
    )
    return f"{header}\n{table}"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    text = profile_step(args)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return text


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
