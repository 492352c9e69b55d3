"""Sequence packing: several samples in one row, isolated from each other, to cut padding.

`plan_packs` groups sample indices into bins of at most `capacity` tokens (best-fit decreasing,
planned once from the cached lengths). `PackedDataset` serves one bin as one concatenated
sample whose `position_ids` restart at 0 for every sample; `PackedCollator` pads bins into a
batch without an `attention_mask`, because the restarting positions alone tell the model where
samples begin (QWen builds a block-diagonal causal mask from them, and so does any transformers
LLM given packed `position_ids` without a mask). Tail padding becomes a segment of its own that
no real token can see and that carries no loss.

Each sample's first label is set to -100 inside a bin: unpacked, the first label is never used
(the model shifts labels by one), but packed it would be "predicted" from the previous sample's
last token. With that, a bin's loss terms are exactly the union of its samples' loss terms.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dataset.collator import SupervisedCollator
from dataset.conversation import IGNORE_INDEX


def plan_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices with total length <= `capacity` (best-fit decreasing).

    Deterministic: the same lengths give the same bins. Runs once per data set (O(n log n));
    the Trainer's sampler shuffles the bins every epoch.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.size and int(sizes.max()) > capacity:
        index = int(sizes.argmax())
        raise ValueError(
            f"sample {index} has {int(sizes[index])} tokens, more than the packing capacity "
            f"{capacity} (--model_max_length)"
        )
    order = np.argsort(-sizes, kind="stable")  # longest first
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for index in order.tolist():
        size = int(sizes[index])
        slot = bisect.bisect_left(free, (size, -1))  # the tightest bin that still fits
        if slot < len(free):
            room, number = free.pop(slot)
        else:
            room, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        bisect.insort(free, (room - size, number))
    return bins


def pack_lengths(lengths: Sequence[int], packs: Sequence[Sequence[int]]) -> list[int]:
    """Total token length of every bin."""
    if not packs:
        return []
    sizes = np.asarray(lengths, dtype=np.int64)[np.concatenate(packs)]  # in bin order
    starts = np.cumsum([0] + [len(pack) for pack in packs[:-1]])
    return np.add.reduceat(sizes, starts).tolist()


class PackedDataset(torch.utils.data.Dataset):
    """One item = one bin of `plan_packs`: its samples concatenated, positions restarting."""

    def __init__(self, dataset: torch.utils.data.Dataset, capacity: int) -> None:
        if len(dataset) == 0:
            # A SupervisedDataset never gets here empty (tokenize_records refuses); any other
            # dataset gets the same plain error instead of an empty plan and a division by 0.
            source = getattr(dataset, "source", "the data set")
            raise ValueError(
                f"no samples to pack in {source}: every sample was dropped or the data is empty"
            )
        self.dataset = dataset
        self.capacity = capacity
        sample_lengths = dataset.lengths
        self.packs = plan_packs(sample_lengths, capacity)
        self._lengths = pack_lengths(sample_lengths, self.packs)

    def __len__(self) -> int:
        return len(self.packs)

    @property
    def lengths(self) -> list[int]:
        """Token length of every bin (for a length-grouped sampler and padding reports)."""
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        return pack_samples([self.dataset[i] for i in self.packs[index]])


def pack_samples(samples: Sequence[dict[str, torch.Tensor | None]]) -> dict:
    """Concatenate samples into one row: input_ids, labels, position_ids `[L]`, images in order."""
    labels = [s["labels"].clone() for s in samples]
    for target in labels:
        target[0] = IGNORE_INDEX  # never predicted from the previous sample (module docstring)
    packed: dict[str, torch.Tensor | None] = {
        "input_ids": torch.cat([s["input_ids"] for s in samples]),  # [L]
        "labels": torch.cat(labels),  # [L]
        "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples]),  # [L]
    }
    for key in ("pixel_values", "vision_features", "image_sizes"):
        images = [s[key] for s in samples if s.get(key) is not None]
        packed[key] = torch.cat(images) if images else None  # [n_img, ...], in sample order
    return packed


@dataclass
class PackedCollator:
    """Pads packed rows into a batch: `position_ids` instead of an `attention_mask`.

    The tail padding of a row gets positions 0, 1, ... so it forms a segment of its own.
    """

    base: SupervisedCollator

    def __call__(self, samples: Sequence[dict[str, torch.Tensor | None]]) -> dict:
        batch = self.base(samples)
        lengths = batch.pop("attention_mask").sum(dim=1)  # [B]
        width = batch["input_ids"].shape[1]
        slots = torch.arange(width)[None, :]  # [1, L]
        positions = torch.nn.utils.rnn.pad_sequence(
            [s["position_ids"] for s in samples], batch_first=True
        )  # [B, L]
        tail = slots - lengths[:, None]  # [B, L]: 0, 1, ... from the end of each row's content
        batch["position_ids"] = torch.where(tail >= 0, tail, positions)
        return batch


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded slots when each batch (a list of indices) is padded to its longest row."""
    sizes = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for batch in batches:
        rows = sizes[np.asarray(batch, dtype=np.int64)]
        real += int(rows.sum())
        padded += int(rows.max()) * len(rows)
    return 1.0 - real / padded if padded else 0.0
