"""What supervised-only logits save: time and peak memory of the LM loss, ours vs full logits.

python -m bench.logits [--batch_size 4 --length 1024 --supervised 0.3 --steps 5]

Both variants run forward + backward of a QWen with the real 151,936-token vocabulary on the same
batch. `full` is what transformers' causal LMs do: `lm_head` over every position, then an fp32
cross-entropy over the shifted labels. `supervised` is `QWenLMHeadModel`'s loss: `lm_head` only
where the next-token label is supervised. Each variant runs in a fresh process, so the peak is
its own: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the process's peak resident set
size (`ru_maxrss`, which includes the model and the Python runtime; compare the two variants).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from bench.measure import timed_backward_steps
from dataset.conversation import IGNORE_INDEX
from demo.tiny_models import TINY_QWEN
from qwen import QWenConfig, QWenLMHeadModel

VARIANTS = ("supervised", "full")
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--supervised", type=float, default=0.3, help="share of tokens with loss")
    parser.add_argument("--hidden_size", type=int, default=TINY_QWEN["hidden_size"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant (internal)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def full_logits_loss(model: QWenLMHeadModel, input_ids, labels) -> torch.Tensor:
    """The transformers way: logits at every position `[B, T, V]`, then transformers' own causal
    LM loss (`ForCausalLMLoss`: fp32 upcast, shift, cross-entropy)."""
    hidden = model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden)  # [B, T, V]
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def run_variant(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    heads = max(1, args.hidden_size // 16)
    size = {
        "hidden_size": args.hidden_size,
        "num_attention_heads": heads,
        "kv_channels": args.hidden_size // heads,
        "intermediate_size": 4 * args.hidden_size,
    }
    config = QWenConfig(**{**TINY_QWEN, **size})
    model = QWenLMHeadModel(config).to(device).train()
    shape = (args.batch_size, args.length)
    input_ids = torch.randint(0, 151_000, shape, device=device)
    labels = input_ids.clone()
    answer_start = int(args.length * (1 - args.supervised))
    labels[:, :answer_start] = IGNORE_INDEX  # the prompt carries no loss

    def compute_loss() -> torch.Tensor:
        if args.variant == "full":
            return full_logits_loss(model, input_ids, labels)
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss

    times, losses, peak = timed_backward_steps(
        compute_loss, args.steps, device, before_step=lambda: model.zero_grad(set_to_none=True)
    )
    return {
        "variant": args.variant,
        "device": device.type,
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_memory_mib": round(peak / MIB, 1),
        "loss": losses[0],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return []
    settings = ("batch_size", "length", "supervised", "hidden_size", "steps")
    passed = [item for name in settings for item in (f"--{name}", str(getattr(args, name)))]
    results = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "bench.logits", *passed, "--variant", variant]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print_table(args, results)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)
    return results


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    supervised, full = results
    print(
        f"batch {args.batch_size} x {args.length} tokens, {args.supervised:.0%} supervised, "
        f"vocabulary 151,936, hidden {args.hidden_size}, {supervised['device']}"
    )
    print("| loss computation | median step (s) | peak memory (MiB) | first loss |")
    print("|---|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['variant']} | {row['median_step_s']:.3f} | {row['peak_memory_mib']:.0f} | "
            f"{row['loss']:.6f} |"
        )
    print(
        f"time ratio supervised/full: {supervised['median_step_s'] / full['median_step_s']:.2f}; "
        f"peak memory saved: {full['peak_memory_mib'] - supervised['peak_memory_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
