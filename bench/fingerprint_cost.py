"""What content identity costs: `module_fingerprint` of a bf16 QWen with Qwen-7B's layer shapes
(embedding, LM head, `--layers` blocks) and `path_fingerprint` of a random file, whole and sampled.

    python -m bench.fingerprint_cost --layers 2 --file_mib 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from identity.fingerprint import module_fingerprint, path_fingerprint
from qwen import QWenConfig, QWenLMHeadModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--file_mib", type=int, default=256)
    args = parser.parse_args()
    config = QWenConfig(hidden_size=4096, num_hidden_layers=args.layers, num_attention_heads=32,
                        intermediate_size=22016, vocab_size=151936)  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    model = QWenLMHeadModel(config)
    tensors, values = len(list(model.parameters())), sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    module_fingerprint(model)
    took = time.perf_counter() - start
    print(
        f"module_fingerprint: {tensors} tensors, {values / 1e9:.2f} B values: {took * 1e3:.0f} ms"
    )
    with tempfile.NamedTemporaryFile(delete=False) as file:
        file.write(os.urandom(args.file_mib << 20))
    try:
        for label, sample_over in (("whole", None), ("sampled", 1 << 26)):
            start = time.perf_counter()
            path_fingerprint(file.name, sample_over=sample_over)
            took = time.perf_counter() - start
            print(f"path_fingerprint, {label} {args.file_mib} MiB file: {took * 1e3:.0f} ms")
    finally:
        os.unlink(file.name)


if __name__ == "__main__":
    main()
