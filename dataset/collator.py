"""Samples -> one batch: right padding, attention mask from lengths, images stacked in order.

`attention_mask` is built from the true lengths, never from `input_ids != pad_token_id`: Qwen
pads with <|endoftext|>, which is also a real token that may appear inside a sample.
`pixel_values` of all samples are concatenated along dim 0 in sample order, matching the order
of the image placeholder runs in the flattened `input_ids`, and so are their `image_sizes`
[n_img, 2] (the model's per-image token counts come from them); a batch without any image has no
`pixel_values` key, so text-only batches never reach the vision tower. Samples read from a
feature cache carry `vision_features` [n_img, N, Dv] instead; they are concatenated the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from dataset.conversation import IGNORE_INDEX


@dataclass
class SupervisedCollator:
    """Collate {"input_ids", "labels", "pixel_values" | "vision_features" | None} samples."""

    pad_token_id: int

    def __call__(
        self, samples: Sequence[dict[str, torch.Tensor | None]]
    ) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        input_ids = [s["input_ids"] for s in samples]
        labels = [s["labels"] for s in samples]
        for position, (ids, target) in enumerate(zip(input_ids, labels, strict=True)):
            if ids.shape != target.shape:
                raise ValueError(
                    f"sample {position} of the batch: input_ids {tuple(ids.shape)} and labels "
                    f"{tuple(target.shape)} differ in shape"
                )
        lengths = torch.tensor([len(ids) for ids in input_ids])  # [B]
        max_length = int(lengths.max())
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": (torch.arange(max_length)[None, :] < lengths[:, None]).long(),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }  # each [B, L]
        # [n_img_total, 3, H, W] (or all tiles) / [n_img_total, N, Dv] / [n_img_total, 2]
        for key in ("pixel_values", "vision_features", "image_sizes"):
            images = [s[key] for s in samples if s.get(key) is not None]
            if images:
                batch[key] = torch.cat(images, dim=0)
        if "pixel_values" in batch and "vision_features" in batch:
            raise ValueError("a batch mixes pixel_values and cached vision_features samples")
        return batch
