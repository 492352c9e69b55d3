"""Preference records -> tokenized pairs -> one batch of chosen and rejected rows (DPO).

A pair renders as two training samples that share their prompt: the prompt is the generation
prompt of its conversation (`encode_prompt`: the training layout up to "<|im_start|>assistant\\n",
history included), each answer is its text + <|im_end|>, the tokens an SFT sample supervises for
that turn. Only the answer carries labels; the history's assistant turns do not.

Length rule: the prompt (images included) must leave room for one answer token under
`model_max_length`, else the pair is dropped; a longer answer is cut at the limit. Both are
counted and logged, as for SFT.

`PreferenceCollator` puts the B pairs' chosen rows first and their rejected rows after
(`input_ids [2B, L]`: row i and row B + i are pair i), right-padded, `attention_mask` from
lengths. The images are collated once per pair (`pixel_values` or `vision_features` of pair 0,
then pair 1, ...): the preference step runs the tower once and gives both rows the features.
Precomputed reference log-probs, when the pairs carry them, come as `reference_log_probs` `[2B]`
in the rows' order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from dataset.build import header_sizes_reader
from dataset.conversation import IGNORE_INDEX, ChatBlocks, encode_text
from dataset.loading import load_records
from dataset.processor import VLMProcessor
from dataset.samples import map_with_processor
from dataset.supervised import SupervisedDataset

if TYPE_CHECKING:
    from visual.feature_cache import FeatureCache

logger = logging.getLogger(__name__)

PAIR_VERSION = 1  # bump when the rendering or the columns change
PAIR_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "chosen_ids": datasets.List(datasets.Value("int32")),
        "rejected_ids": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # prompt + the longer answer
        "truncated": datasets.Value("bool"),
    }
)


def _tokenize_pairs(
    batch: dict[str, list],
    processor: VLMProcessor,
    model_max_length: int,
    image_sizes_of: Callable[[Sequence[str]], list[tuple[int, int]]] | None,
    source: str,
) -> dict[str, list]:
    """Batched map function: render each pair; pairs whose prompt cannot fit are left out."""
    blocks = ChatBlocks.build(processor.tokenizer)
    _, suffix = blocks.roles["assistant"]
    out: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    rows = zip(
        batch["id"], batch["images"], batch["roles"], batch["contents"],
        batch["chosen"], batch["rejected"], strict=True,
    )  # fmt: skip
    for record_id, images, roles, contents, chosen, rejected in rows:
        sizes = image_sizes_of(images) if image_sizes_of is not None else None
        try:
            prompt = processor.prompt_ids(roles, contents, sizes, blocks=blocks)
        except ValueError as err:
            raise ValueError(f"record {record_id!r} of {source}: {err}") from err
        room = model_max_length - len(prompt)
        if room < 1:
            continue
        answers = [encode_text(processor.tokenizer, text) + suffix for text in (chosen, rejected)]
        out["id"].append(record_id)
        out["images"].append(images)
        out["prompt_ids"].append(prompt)
        out["chosen_ids"].append(answers[0][:room])
        out["rejected_ids"].append(answers[1][:room])
        out["length"].append(len(prompt) + min(room, max(map(len, answers))))
        out["truncated"].append(max(map(len, answers)) > room)
    return out


def tokenize_pairs(
    records: datasets.Dataset,
    processor: VLMProcessor,
    *,
    model_max_length: int,
    image_sizes_of: Callable[[Sequence[str]], list[tuple[int, int]]] | None = None,
    num_proc: int | None = None,
    source: str = "the records",
) -> datasets.Dataset:
    """Tokenize preference `records` (columns of `dataset.loading`) once, cached on disk; raises
    ValueError naming `source` when no pair fits `model_max_length`. `image_sizes_of` as in
    `dataset.samples.tokenize_records` (needed when the image token count depends on the size)."""
    pairs, _ = map_with_processor(
        records,
        _tokenize_pairs,
        processor,
        model_max_length=model_max_length,
        image_sizes_of=image_sizes_of,
        num_proc=num_proc,
        source=source,
        features=PAIR_FEATURES,
        version=f"pairs|{PAIR_VERSION}",
        desc="tokenizing preference pairs",
    )
    if len(pairs) == 0:
        raise ValueError(
            f"--model_max_length {model_max_length} leaves no room for an answer after the "
            f"prompt of any pair of {source} (all {len(records)} dropped)"
        )
    truncated = pc.sum(pairs.with_format("arrow")["truncated"]).as_py() or 0
    dropped = len(records) - len(pairs)
    if truncated or dropped:
        logger.warning(
            "%s, model_max_length=%d: %d of %d pairs had an answer cut, %d dropped (the prompt "
            "left no room for an answer)",
            source, model_max_length, truncated, len(records), dropped,
        )  # fmt: skip
    return pairs


class PreferenceDataset(SupervisedDataset):
    """Tokenized pairs -> {"prompt_ids", "chosen_ids", "rejected_ids"} `[L_*]` and the pair's
    images, read as `SupervisedDataset` reads them (image folder or feature cache). Once the run
    layer has set `reference_log_probs` (`[pairs, 2]`: the reference's summed log-probs of the
    chosen and the rejected answer, `--precompute_ref_log_probs`), each pair carries its row."""

    ids_column = "prompt_ids"  # where the pair's image placeholders are
    reference_log_probs: torch.Tensor | None = None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        row = self.samples[index]
        sample = {
            key: torch.tensor(row[key], dtype=torch.long)
            for key in ("prompt_ids", "chosen_ids", "rejected_ids")
        }
        if self.reference_log_probs is not None:
            sample["reference_log_probs"] = self.reference_log_probs[index]  # [2]
        return {**sample, **self._image_inputs_or_cached(row)}


@dataclass
class PreferenceCollator:
    """B pairs -> `input_ids`, `attention_mask`, `labels` `[2B, L]` (chosen rows, then rejected
    rows) and the pairs' images once each."""

    pad_token_id: int

    def __call__(self, pairs: Sequence[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        input_ids, labels = [], []
        for answer in ("chosen_ids", "rejected_ids"):
            for pair in pairs:
                prompt = pair["prompt_ids"]
                input_ids.append(torch.cat([prompt, pair[answer]]))  # [L_i]
                ignored = torch.full_like(prompt, IGNORE_INDEX)
                labels.append(torch.cat([ignored, pair[answer]]))  # [L_i]
        lengths = torch.tensor([len(ids) for ids in input_ids])  # [2B]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long(),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }  # each [2B, L]
        if pairs[0].get("reference_log_probs") is not None:  # [B, 2] -> [2B], as the rows
            batch["reference_log_probs"] = torch.stack(
                [pair["reference_log_probs"] for pair in pairs], dim=1
            ).flatten()
        for key in ("pixel_values", "vision_features", "image_sizes"):  # once per pair, in order
            images = [p[key] for p in pairs if p.get(key) is not None]
            if images:
                batch[key] = torch.cat(images, dim=0)
        return batch


def build_preference_dataset(
    path: str | os.PathLike,
    processor: VLMProcessor,
    *,
    image_folder: str | os.PathLike | None,
    load_image: Callable[[Path], Image.Image],
    model_max_length: int,
    read_image_size: Callable[[Path], tuple[int, int]] | None = None,
    skip_invalid: bool = False,
    check_images: bool = True,
    allow_outside_image_folder: bool = False,
    cache_dir: str | os.PathLike | None = None,
    feature_cache: FeatureCache | None = None,
) -> PreferenceDataset:
    """`dataset.build.build_supervised_dataset` for preference records: validated by the same
    validator (training records are refused, named), tokenized as pairs, wrapped."""
    records, report = load_records(
        path,
        image_folder=image_folder,
        skip_invalid=skip_invalid,
        check_images=check_images,
        allow_outside_image_folder=allow_outside_image_folder,
        cache_dir=cache_dir,
        preference=True,
    )
    sizes_of = header_sizes_reader(read_image_size, image_folder, allow_outside_image_folder)
    pairs = tokenize_pairs(
        records, processor, model_max_length=model_max_length, image_sizes_of=sizes_of,
        source=str(path),
    )  # fmt: skip
    logger.info(
        "%s: %d records, %d invalid skipped, %d pairs",
        path, report.counts["read"], report.num_invalid, len(pairs),
    )  # fmt: skip
    return PreferenceDataset(
        pairs,
        image_folder=image_folder,
        load_image=load_image,
        processor=processor,
        feature_cache=feature_cache,
        allow_outside_image_folder=allow_outside_image_folder,
        source=str(path),
    )
