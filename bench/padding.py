"""Padding fraction of an epoch's batches: random order, length-grouped, packed.

python -m bench.padding [--samples 20000 --batch_size 16 --image_tokens 576 --max_length 2048]

Sample lengths are the LLaVA-like mix of bench/batches.py (text) plus one image of
`--image_tokens` placeholders each (576 = CLIP-L/14-336). Orders compared, as `train.py` makes
them: the Trainer's random sampler; `--group_by_length` (transformers' LengthGroupedSampler
order); `--packing` (dataset/packing.py bins of `--max_length`, batches of `--pack_batch_size`
bins in random order). The padding fraction is padded slots / all slots when every batch is
padded to its longest row.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from bench.batches import llava_like_lengths
from dataset.packing import pack_lengths, padding_fraction, plan_packs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch_size", type=int, default=16, help="samples per batch, unpacked")
    parser.add_argument("--pack_batch_size", type=int, default=4, help="bins per batch, packed")
    parser.add_argument("--image_tokens", type=int, default=576)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def measure(args: argparse.Namespace) -> list[dict]:
    texts = np.asarray(llava_like_lengths(args.samples, args.seed))
    lengths = np.minimum(texts + args.image_tokens, args.max_length).tolist()
    generator = torch.Generator().manual_seed(args.seed)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()
    grouped_order = get_length_grouped_indices(lengths, args.batch_size, generator=generator)
    packs = plan_packs(lengths, args.max_length)
    bin_lengths = pack_lengths(lengths, packs)
    pack_order = torch.randperm(len(packs), generator=generator).tolist()
    grouped_packs = get_length_grouped_indices(
        bin_lengths, args.pack_batch_size, generator=generator
    )
    unpacked, packed = (lengths, args.batch_size), (bin_lengths, args.pack_batch_size)
    rows = [
        ("random batches", *unpacked, random_order),
        ("--group_by_length", *unpacked, grouped_order),
        ("--packing", *packed, pack_order),
        ("--packing --group_by_length", *packed, grouped_packs),
    ]
    results = []
    for name, sizes, batch_size, order in rows:
        batches = chunks(order, batch_size)
        slots = sum(max(sizes[i] for i in batch) * len(batch) for batch in batches)
        results.append(
            {
                "order": name,
                "rows_per_batch": batch_size,
                "batches": len(batches),
                "padded_slots": slots,
                "padding_fraction": round(padding_fraction(sizes, batches), 4),
            }
        )
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    results = measure(args)
    print(
        f"{args.samples} LLaVA-like samples (text + {args.image_tokens} image tokens, "
        f"<= {args.max_length}); {sum(r['padded_slots'] for r in results[:1])} slots unpacked"
    )
    print("| order | rows per batch | batches per epoch | token slots | padding |")
    print("|---|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['order']} | {row['rows_per_batch']} | {row['batches']} | "
            f"{row['padded_slots']:,} | {row['padding_fraction']:.1%} |"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
