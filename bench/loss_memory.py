"""What the chunked LM loss saves: peak memory and time of the loss alone, three ways.

python -m bench.loss_memory [--sizes 2x2048,16x2048 --supervised 0.3,0.9 --steps 3]

Each cell runs forward + backward of the loss alone - final hidden states `[B, T, H]` (a leaf
that requires grad, as the LLM's output does) through a frozen `lm_head` with the real 151,936-token
vocabulary to the mean cross-entropy over the supervised tokens - in a fresh process, so its peak is
its own:
- `full`: what transformers' causal LMs do, `lm_head` at every position `[B, T, V]`, then
  transformers' `ForCausalLMLoss` (fp32 upcast, shift, cross-entropy);
- `supervised`: the loss before qwen/loss.py, `lm_head` at the supervised positions only, all at
  once, then `F.cross_entropy` on their fp32 logits `[n, V]`;
- `chunked`: `qwen.loss.supervised_cross_entropy`, `--chunk_size` supervised tokens at a time.
Memory on a CPU is the process's peak resident set size (`ru_maxrss`) and its rise above the
resident size just before the first step (the loss's own peak); on a GPU the allocator's peak and
its rise. Cells whose estimated peak exceeds `--max_gib` are skipped, not run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from bench.measure import rss_bytes, timed_backward_steps
from demo.tiny_models import TINY_QWEN
from qwen.loss import DEFAULT_LOSS_CHUNK_SIZE, IGNORE_INDEX, supervised_cross_entropy

VARIANTS = ("full", "supervised", "chunked")
VOCAB = TINY_QWEN["vocab_size"]
GIB = 2**30
# fp32 [rows, V] tensors alive at a loss's peak: unchunked, log_softmax's output, the gradient
# nll_loss writes and log_softmax's gradient; chunked, a chunk's logits and their log_softmax.
COPIES = {"full": 3, "supervised": 3, "chunked": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2x2048,16x2048", help="batch x length, comma-separated")
    parser.add_argument("--supervised", default="0.3,0.9", help="shares of supervised tokens")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hidden_size", type=int, default=TINY_QWEN["hidden_size"])
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=3, help="steps per cell; the first is warmup")
    parser.add_argument("--max_gib", type=float, default=16.0, help="skip cells estimated above")
    parser.add_argument("--cell", help="run one cell, 'variant:BxT:share' (internal)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def supervised_rows(batch_size: int, length: int, share: float) -> int:
    """Supervised tokens of the synthetic batch: each row's last `share` of tokens, shifted."""
    return batch_size * (length - max(1, int(length * (1 - share))))


def estimated_gib(variant: str, batch_size: int, length: int, share: float, chunk: int) -> float:
    rows = {
        "full": batch_size * length,
        "supervised": supervised_rows(batch_size, length, share),
        "chunked": min(chunk, supervised_rows(batch_size, length, share)),
    }[variant]
    return COPIES[variant] * rows * VOCAB * 4 / GIB


def loss_of(variant: str, hidden, labels, lm_head: nn.Module, chunk_size: int) -> torch.Tensor:
    if variant == "full":
        logits = lm_head(hidden)  # [B, T, V]
        return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    if variant == "supervised":  # QWenLMHeadModel._supervised_loss before the chunked loss
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = lm_head(hidden[:, :-1][keep]).float()  # [n, V]
        return F.cross_entropy(logits, targets[keep])
    return supervised_cross_entropy(hidden, labels, lm_head, chunk_size)


def run_cell(args: argparse.Namespace) -> dict:
    variant, size, share = args.cell.split(":")
    batch_size, length = (int(x) for x in size.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    lm_head = nn.Linear(args.hidden_size, VOCAB, bias=False, device=device, dtype=dtype)
    lm_head.requires_grad_(False)
    shape = (batch_size, length, args.hidden_size)
    hidden = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)  # [B, T, H]
    labels = torch.randint(0, VOCAB, (batch_size, length), device=device)
    labels[:, : int(length * (1 - float(share)))] = IGNORE_INDEX  # the prompt carries no loss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()

    def clear() -> None:
        hidden.grad = None

    times, losses, peak = timed_backward_steps(
        lambda: loss_of(variant, hidden, labels, lm_head, args.chunk_size),
        args.steps,
        device,
        before_step=clear,
    )
    return {
        "variant": variant,
        "size": size,
        "supervised": float(share),
        "supervised_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "device": device.type,
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_gib": peak / GIB,
        "loss_peak_gib": (peak - before) / GIB,
        "loss": losses[0],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return []
    passed = [f"--{name}={getattr(args, name)}" for name in ("hidden_size", "chunk_size", "steps")]
    passed.append(f"--dtype={args.dtype}")
    results = []
    for size in args.sizes.split(","):
        batch_size, length = (int(x) for x in size.split("x"))
        for share in args.supervised.split(","):
            for variant in args.variants.split(","):
                estimate = estimated_gib(variant, batch_size, length, float(share), args.chunk_size)
                row = {"variant": variant, "size": size, "supervised": float(share)}
                if estimate > args.max_gib:
                    results.append({**row, "skipped": f"estimated {estimate:.0f} GiB"})
                    continue
                cell = f"{variant}:{size}:{share}"
                command = [sys.executable, "-m", "bench.loss_memory", *passed, "--cell", cell]
                output = subprocess.run(command, check=True, capture_output=True, text=True)
                results.append(json.loads(output.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print_table(args, results)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)
    return results


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"loss forward + backward, vocabulary {VOCAB:,}, hidden {args.hidden_size}, {args.dtype}, "
        f"frozen lm_head, chunk {args.chunk_size}, median of steps 2-{args.steps}"
    )
    print("| tokens | supervised | loss | step (s) | peak (GiB) | loss peak (GiB) | loss |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in results:
        head = f"| {row['size']} | {row['supervised']:.0%} | {row['variant']} |"
        if "skipped" in row:
            print(f"{head} skipped ({row['skipped']}) | | | |")
            continue
        print(
            f"{head} {row['median_step_s']:.2f} | {row['peak_gib']:.2f} | "
            f"{row['loss_peak_gib']:.2f} | {row['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
