"""FSDP2 on the tiny VLM on CPU, for tests/test_engines.py: torch's `fully_shard` over gloo with
this toolkit's own FSDP parts (the wrap unit from `fsdp_settings`, the text-only probe, the gathered
save, loading before sharding), without the Trainer: accelerate 1.15 turns FSDP on only for GPU
processes (a CPU process becomes MULTI_CPU and the FSDP plugin is ignored), so the Trainer path
needs a GPU. Run under torchrun, or alone as the 1-process reference.

Every step's global batch is all of `--data`; rank r of W takes the r-th equal slice, so with
[image, text, text, text] and 2 ranks one rank has an image and the other none, every step.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py --out DIR ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import train
from model.checkpoint import save_trainable
from runtime.config import load_config
from runtime.data import build_datasets
from runtime.engines import fsdp_settings, gathered_trainable_state
from runtime.resume import load_trainable_state


def parse_args():
    parser = argparse.ArgumentParser()
    for name in ("qwen", "clip", "data", "images", "out", "fsdp"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train_mode", default="projector+lora")
    parser.add_argument("--resume", help="a checkpoint whose trainable weights to start from")
    return parser.parse_args()


def shard(vlm, fsdp_path: str) -> None:
    """FSDP2 as accelerate applies it: each decoder layer a unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    layer_names = set(fsdp_settings(fsdp_path, vlm.llm)["transformer_layer_cls_to_wrap"])
    layers = [m for m in vlm.modules() if type(m).__name__ in layer_names]
    assert layers, f"no module named {layer_names}"
    for layer in layers:
        fully_shard(layer)
    fully_shard(vlm)


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    config = load_config(None, {
        "language_model": args.qwen, "dtype": "float32", "vision_model": args.clip,
        "data_path": args.data, "image_folder": args.images, "model_max_length": 128,
        "train_mode": args.train_mode, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "output_dir": args.out, "seed": 7,
    })  # fmt: skip
    vlm, tokenizer = train.build_model(config)
    description = train.run_description(vlm, config)
    if args.resume:
        load_trainable_state(vlm, args.resume)  # before sharding, as runtime/trainer.py does
    dataset, _, collator = build_datasets(config.data, vlm, tokenizer)
    per_rank = len(dataset) // world
    batch = collator([dataset[i] for i in range(rank * per_rank, (rank + 1) * per_rank)])
    if world > 1:
        shard(vlm, args.fsdp)
        sharded = [n for n, p in vlm.named_parameters() if type(p).__name__ == "DTensor"]
        assert len(sharded) == len(list(vlm.parameters())), "not every weight is sharded"
    vlm.train()
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(args.steps):
        loss = vlm(**batch).loss
        loss.backward()  # FSDP2 averages the gradients over the ranks, as DDP does
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
        losses.append(logged.item() / world)
    gathered = gathered_trainable_state(vlm)  # every rank takes part
    if rank == 0:
        save_trainable(vlm, tokenizer, args.out, description, gathered)
        Path(args.out, "losses.json").write_text(json.dumps(losses))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
