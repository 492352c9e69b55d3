"""This machine's matmul peak, measured: the denominator of MFU where no datasheet number applies.

python -m bench.gemm_peak --scale qwen0.5b-clipb16

On a CPU the peak depends on the cores, the vector units (AVX-512, AMX), the threads torch uses
and how loaded the machine is, so `bench.train_step` measures it in the same process, just before
its rounds: the best dense `torch.matmul` throughput over the GEMM shapes the model runs (tokens x
hidden x {Q/K/V, hidden, MLP, vocabulary} and the MLP's down projection), best of `repeats`
after a warm-up call. The MFU it reports is model FLOPs / step time / this peak. bf16 is measured
too where the CPU has bf16 matmul instructions (avx512_bf16 or AMX), for reference: the benchmark
itself runs in the weights' dtype.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.flops import LanguageDims

REPEATS = 3


def gemm_shapes(
    language: LanguageDims, tokens: int, head_tokens: int
) -> list[tuple[int, int, int]]:
    """(M, K, N) of the LLM's matmuls for `tokens` rows; the LM head sees `head_tokens` rows at a
    time (the chunked loss's chunk)."""
    h, f = language.hidden_size, language.mlp_width
    qkv = h + 2 * (language.kv_size or h)
    return [
        (tokens, h, qkv),
        (tokens, h, h),
        (tokens, h, f),
        (tokens, f, h),
        (min(head_tokens, tokens), h, language.vocab_size),
    ]


def cpu_has_bf16_matmul() -> bool:
    """avx512_bf16 or AMX in /proc/cpuinfo, and oneDNN available to use them."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(flags))


def best_flops(shape: tuple[int, int, int], dtype: torch.dtype, repeats: int = REPEATS) -> float:
    """Best FLOP/s of `a @ b` at `shape` over `repeats` timed calls (one untimed first)."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def measure_peak(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = REPEATS
) -> dict:
    """The best FLOP/s over `shapes` (`peak_flops`) and each shape's own best."""
    per_shape = [{"shape": list(s), "flops": best_flops(s, dtype, repeats)} for s in shapes]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "peak_flops": max(row["flops"] for row in per_shape),
        "per_shape": per_shape,
        "threads": torch.get_num_threads(),
    }


def measure_cpu_peaks(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = REPEATS
) -> dict[str, dict]:
    """The run's dtype, plus bf16 where the CPU multiplies bf16 natively."""
    peaks = {str(dtype).removeprefix("torch."): measure_peak(shapes, dtype, repeats)}
    if dtype != torch.bfloat16 and cpu_has_bf16_matmul():
        peaks["bfloat16"] = measure_peak(shapes, torch.bfloat16, repeats)
    return peaks


def main(argv: list[str] | None = None) -> dict:
    from bench.models import build_llm, language_dims
    from bench.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(PRESETS), default="qwen0.5b-clipb16")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the LLM's matmuls")
    parser.add_argument("--head_tokens", type=int, default=512, help="rows of the LM head's")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    with torch.device("meta"):
        language = language_dims(build_llm(PRESETS[args.scale]).config)
    shapes = gemm_shapes(language, args.tokens, args.head_tokens)
    peaks = measure_cpu_peaks(shapes, torch.float32, args.repeats)
    print(json.dumps(peaks, indent=2))
    return peaks


if __name__ == "__main__":
    main()
