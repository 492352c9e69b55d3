"""The chunked LM loss through a frozen head: two head matmuls per chunk against three, paired.

python -m bench.frozen_head_loss --rounds 5

At real width (Qwen2-0.5B: hidden 896, vocabulary 151,936; 2 x 1024 tokens, 828 supervised, as
`bench.train_step --scale qwen0.5b-clipb16`), forward + backward of `qwen/loss.py`'s loss with a
frozen bias-free `nn.Linear` head, two ways in alternating order on the same tensors: the frozen
path (input gradient formed in the forward) and the checkpointed path it replaced (forced by a
no-op forward hook on the head, which the frozen path refuses). Prints each round, the median
times and the median paired ratio; both give the same loss and gradient (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qwen.loss import IGNORE_INDEX, supervised_cross_entropy


def timed(hidden, labels, head) -> tuple[float, torch.Tensor, torch.Tensor]:
    hidden.grad = None
    start = time.perf_counter()
    loss = supervised_cross_entropy(hidden, labels, head)
    loss.backward()
    return time.perf_counter() - start, loss.detach(), hidden.grad


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--supervised", type=int, default=828, help="of 2 x 1024 tokens")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    frozen = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hooked = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hooked.weight = frozen.weight
    hooked.register_forward_pre_hook(lambda module, inputs: None)
    hidden = torch.randn(2, 1024, args.hidden, requires_grad=True)  # [B, T, H]
    labels = torch.randint(0, args.vocab, (2, 1024))
    labels[:, : 1024 - args.supervised // 2] = IGNORE_INDEX  # the last tokens of each row
    seconds = {"frozen": [], "checkpointed": []}
    for round_index in range(args.rounds):
        order = ("frozen", "checkpointed") if round_index % 2 == 0 else ("checkpointed", "frozen")
        results = {}
        for path in order:
            results[path] = timed(hidden, labels, frozen if path == "frozen" else hooked)
            seconds[path].append(results[path][0])
        torch.testing.assert_close(results["frozen"][1], results["checkpointed"][1])
        torch.testing.assert_close(results["frozen"][2], results["checkpointed"][2])
        print(f"round {round_index + 1}: " + ", ".join(f"{p} {results[p][0]:.3f}s" for p in order))
    ratios = [a / b for a, b in zip(seconds["frozen"], seconds["checkpointed"], strict=True)]
    summary = {
        "frozen_median_s": statistics.median(seconds["frozen"]),
        "checkpointed_median_s": statistics.median(seconds["checkpointed"]),
        "median_paired_ratio": statistics.median(ratios),
    }
    print(summary)
    return summary


if __name__ == "__main__":
    main()
