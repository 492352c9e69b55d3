"""Training-step benchmark: our VLM against transformers' LLaVA on identical weights and batches.

python -m bench.train_step --scale tiny --steps 20 --warmup 3 --batch_size 8 [--mode projector]
python -m bench.train_step --scale qwen7b-clip336 --batch_size 4 --gradient-checkpointing
python -m bench.train_step --scale qwen0.5b-clipb16 --steps 2 --warmup 1 --out FILE.json
python -m bench.train_step --scale tiny --image_aspect_ratio anyres [--image_grid_pinpoints ...]

The second is for a GPU: both 7B models are resident at once (2 x 15 GiB in bf16). The third is
real width on a CPU (Qwen2-0.5B's dimensions through `inputs_embeds`, CLIP-B/16, 2 x 1024 tokens;
`qwen0.5b-clipb16-native` is a native QWen of the same size); `--layers N` cuts the LLM's depth.
On a CPU the MFU's peak is measured in the same run (bench/gemm_peak.py). The fourth trains AnyRes
(LLaVA-NeXT tiling, training's default pinpoints unless given) against transformers'
`LlavaNextForConditionalGeneration`, each fed by its own processor (bench/paired_batches.py).

Weights are random (no download). For each round, every implementation runs one step on the
same synthetic batch (ours, then the reference); the first `--warmup` rounds are not timed.
Reported per implementation: median step time, throughput, padding, memory (see
bench/measure.py for what is measured), the first step's loss (identical weights, so both must
agree), achieved model TFLOP/s and MFU (bench/flops.py counts the useful FLOPs).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from bench.batches import batch_stats
from bench.flops import peak_tflops_for, step_flops
from bench.gemm_peak import gemm_shapes, measure_cpu_peaks
from bench.measure import (
    MEMORY_NOTE,
    StepResult,
    make_optimizer,
    resident_bytes,
    train_step,
    trainable_parameters,
)
from bench.models import (
    MODES,
    adapted_linears,
    add_gradient_checkpointing_flag,
    model_dims,
    prepare_models,
)
from bench.paired_batches import on_device, paired_batches
from bench.presets import PRESETS
from dataprocess.config import list_flag
from model.config import LoraSettings
from qwen.loss import loss_chunk_size

logger = logging.getLogger("bench.train_step")

IMPLS = ("ours", "reference")
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--impl", choices=[*IMPLS, "both"], default="both")
    parser.add_argument("--mode", choices=MODES, default="lora")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the scale's")
    parser.add_argument("--layers", type=int, default=None, help="LLM blocks (default: scale's)")
    parser.add_argument("--max_length", type=int, default=None, help="default: the scale's")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument(
        "--lora_targets",
        default=None,
        help="our LLM's adapted linears, '|'-separated (default: the scale's, else LoraSettings')",
    )
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--image_aspect_ratio", choices=["pad", "anyres"], default="pad")
    parser.add_argument(
        "--image_grid_pinpoints",
        type=list_flag,
        default=None,
        help="anyres: [[height, width], ...] in pixels (default: training's, for the tower)",
    )
    add_gradient_checkpointing_flag(parser)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="default: by GPU name; on a CPU measured in the run (bench/gemm_peak.py)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    preset = PRESETS[args.scale]
    args.max_length = args.max_length or preset.max_length
    args.batch_size = args.batch_size or preset.batch_size
    args.lora_targets = args.lora_targets or preset.lora_targets or LoraSettings.target_modules
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch_size must be >= 1, --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.image_grid_pinpoints is not None and args.image_aspect_ratio != "anyres":
        parser.error("--image_grid_pinpoints applies to --image_aspect_ratio anyres only")
    return args


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype; refuses combinations that cannot run (named by flag)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.mode == "qlora" and device.type != "cuda":
        raise ValueError(
            f"--mode qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); the device is {device}"
        )
    if not PRESETS[args.scale].cpu and device.type != "cuda":
        cpu_scales = ", ".join(name for name, preset in PRESETS.items() if preset.cpu)
        raise ValueError(
            f"--scale {args.scale} builds a real-size model and is meant for a GPU; "
            f"the device is {device} (on a CPU use --scale tiny or {cpu_scales})"
        )
    return device, dtype


def loss_chunk(vlm: nn.Module) -> int:
    """Rows of the LM head's matmul in our chunked loss."""
    return loss_chunk_size(vlm.llm.config)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build, run the paired rounds, return the results (see `summarize`)."""
    device, dtype = resolve_device(args)
    preset = PRESETS[args.scale]
    if args.layers is not None:
        preset = preset.with_layers(args.layers)
    impls = list(IMPLS) if args.impl == "both" else [args.impl]
    lora = LoraSettings(
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets,
    )
    models, vlm = prepare_models(
        preset,
        mode=args.mode,
        impls=impls,
        device=device,
        dtype=dtype,
        lora=lora,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        image_aspect_ratio=args.image_aspect_ratio,
        image_grid_pinpoints=args.image_grid_pinpoints,
    )
    pairs = paired_batches(
        vlm,
        args.warmup + args.steps,
        args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        preset=preset,
        image_aspect_ratio=args.image_aspect_ratio,
    )
    stats = [batch_stats(pair["ours"], vlm.image_token_id) for pair in pairs]
    batches = [on_device(pair, device) for pair in pairs]
    optimizers = {impl: make_optimizer(model, args.lr) for impl, model in models.items()}
    autocast = dtype if device.type == "cuda" and dtype != torch.float32 else None
    dims = model_dims(vlm)
    gemm_peaks = None
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = peak_tflops_for(device_name(device))
    peak_flops = None if peak_tflops is None else peak_tflops * 1e12
    if peak_flops is None and device.type != "cuda":  # measured here, as the steps run
        tokens = int(batches[0]["ours"]["attention_mask"].sum())
        shapes = gemm_shapes(dims[1], tokens, loss_chunk(vlm))
        gemm_peaks = measure_cpu_peaks(shapes, dtype)
        peak_flops = gemm_peaks[str(dtype).removeprefix("torch.")]["peak_flops"]  # kept exact
        peak_tflops = peak_flops / 1e12
    steps = run_rounds(models, optimizers, batches, autocast)
    flops_config = {"mode": args.mode, "lora_rank": args.lora_rank, "dims": dims}
    per_impl = {
        impl: impl_summary(
            impl,
            steps[impl],
            stats,
            args,
            resident=resident_bytes(model, optimizers[impl]),
            trainable=trainable_parameters(model),
            flops_config={**flops_config, "lora": adapted_linears(model)},
            peak_tflops=peak_tflops,
        )
        for impl, model in models.items()
    }
    results = summarize(args, device, dtype, stats, per_impl, steps)
    results["gemm_peaks"] = gemm_peaks
    results["peak_gemm_flops"] = peak_flops
    return results


def run_rounds(
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    batches: list[dict[str, dict[str, torch.Tensor]]],
    autocast: torch.dtype | None,
) -> dict[str, list[StepResult]]:
    """Each round runs every implementation once on the same samples, each on its own inputs
    (`batches[round][impl]`): ours, then the reference."""
    steps: dict[str, list[StepResult]] = {impl: [] for impl in models}
    for round_index, pair in enumerate(batches):
        for impl, model in models.items():
            steps[impl].append(train_step(model, optimizers[impl], pair[impl], autocast))
        logger.info(
            "round %d/%d: %s",
            round_index + 1,
            len(batches),
            ", ".join(f"{i} {s[-1].seconds:.3f}s loss {s[-1].loss:.4f}" for i, s in steps.items()),
        )
    return steps


def impl_summary(
    impl: str,
    steps: list[StepResult],
    stats: list[dict],
    args: argparse.Namespace,
    *,
    resident: int,
    trainable: int,
    flops_config: dict,
    peak_tflops: float | None,
) -> dict:
    """Median step time, throughput over the timed window, memory, first loss, TFLOP/s, MFU."""
    timed, timed_stats = steps[args.warmup :], stats[args.warmup :]
    seconds = sum(step.seconds for step in timed)
    vision, language = flops_config["dims"]
    rank = 0 if flops_config["mode"] == "projector" else flops_config["lora_rank"]
    lora = flops_config["lora"] if rank else None
    flops = sum(
        step_flops(vision, language, batch, lora_rank=rank, lora=lora)["total"]
        for batch in timed_stats
    )
    transient = max(step.transient_peak_bytes for step in timed)
    achieved = flops / seconds / 1e12
    return {
        "median_step_s": statistics.median(step.seconds for step in timed),
        "samples_per_s": args.batch_size * len(timed) / seconds,
        "tokens_per_s": sum(batch["tokens"] for batch in timed_stats) / seconds,
        "padding_fraction": statistics.fmean(b["padding_fraction"] for b in timed_stats),
        "step_transient_peak_gib": transient / GIB,
        "resident_gib": resident / GIB,
        "peak_memory_gib": (resident + transient) / GIB,
        "first_loss": steps[0].loss,
        "losses": [step.loss for step in steps],
        "step_seconds": [step.seconds for step in timed],
        "trainable_parameters": trainable,
        "model_tflop_per_step": flops / len(timed) / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "peak_tflops": peak_tflops,
    }


def summarize(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    stats: list[dict],
    per_impl: dict[str, dict],
    steps: dict[str, list[StepResult]],
) -> dict:
    """The JSON document: setup, batch statistics, per-impl results, paired comparisons."""
    timed_stats = stats[args.warmup :]
    results = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": str(device),
            "device_name": device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "batches": {
            "padding_fraction": statistics.fmean(b["padding_fraction"] for b in timed_stats),
            "tokens_per_step": statistics.fmean(b["tokens"] for b in timed_stats),
            "supervised_tokens_per_step": statistics.fmean(
                b["supervised_tokens"] for b in timed_stats
            ),
            "longest_sequence": max(max(b["sequence_lengths"]) for b in timed_stats),
            "image_tokens_per_sample": statistics.fmean(
                b["image_tokens"] / len(b["sequence_lengths"]) for b in timed_stats
            ),
            "tower_images_per_step": statistics.fmean(b["tower_images"] for b in timed_stats),
        },
        "impls": per_impl,
        "first_loss_max_abs_diff": None,
        "median_step_ratio_ours_over_reference": None,
        # The headline numbers: paired step-time ratio, peak-memory ratio, our MFU.
        "ratio_step_time": None,
        "ratio_peak_memory": None,
        "mfu": per_impl.get("ours", {}).get("mfu"),
        "memory_note": MEMORY_NOTE["cuda" if device.type == "cuda" else "cpu"],
    }
    if len(per_impl) == 2:
        ours, reference = steps["ours"], steps["reference"]
        results["first_loss_max_abs_diff"] = abs(ours[0].loss - reference[0].loss)
        ratios = [a.seconds / b.seconds for a, b in zip(ours, reference, strict=True)]
        results["median_step_ratio_ours_over_reference"] = statistics.median(ratios[args.warmup :])
        results["ratio_step_time"] = results["median_step_ratio_ours_over_reference"]
        results["ratio_peak_memory"] = (
            per_impl["ours"]["peak_memory_gib"] / per_impl["reference"]["peak_memory_gib"]
        )
    return results


def markdown_table(results: dict) -> str:
    """The results as a markdown table plus the paired comparisons."""
    config = results["config"]
    lines = [
        f"scale {config['scale']}, mode {config['mode']}, image_aspect_ratio "
        f"{config['image_aspect_ratio']} ({results['batches']['image_tokens_per_sample']:.1f} "
        f"image tokens a sample), batch {config['batch_size']}, "
        f"max_length {config['max_length']}, {config['steps']} steps after {config['warmup']} "
        f"warmup, gradient checkpointing {config['gradient_checkpointing']}, "
        f"{config['dtype']} on {config['device_name']}",
        "",
        "| impl | median step (s) | samples/s | tokens/s | padding | peak mem (GiB) "
        "| first loss | model TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for impl, r in results["impls"].items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {impl} | {r['median_step_s']:.4f} | {r['samples_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['padding_fraction']:.3f} "
            f"| {r['peak_memory_gib']:.2f} | {r['first_loss']:.6f} "
            f"| {r['achieved_tflops']:.3f} | {mfu} |"
        )
    if results["first_loss_max_abs_diff"] is not None:
        lines += [
            "",
            f"first-step loss max |ours - reference|: {results['first_loss_max_abs_diff']:.3e}",
            "median paired step-time ratio ours/reference: "
            f"{results['median_step_ratio_ours_over_reference']:.3f}, "
            f"peak-memory ratio {results['ratio_peak_memory']:.3f}",
        ]
    for dtype, peak in (results.get("gemm_peaks") or {}).items():
        role = "MFU's denominator" if dtype == config["dtype"] else "for reference"
        lines.append(
            f"measured {dtype} matmul peak ({role}): "
            f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s, {peak['threads']} threads"
        )
    lines.append(f"memory: {results['memory_note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table (and write --out / --markdown); return the results."""
    args = parse_args(argv)
    results = run_benchmark(args)
    table = markdown_table(results)
    print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.markdown is not None:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main()
    except ValueError as error:  # a bad flag combination: one clear line, no traceback
        logger.error("%s", error)
        sys.exit(2)
