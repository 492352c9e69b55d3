"""Synthetic training batches with a LLaVA-like length mix, shaped exactly like the collator's.

Each sample is one image (N placeholder tokens, already expanded as in the data pipeline) inside
a text turn: a short header, the image, the rest of the prompt, then the answer. Only the answer
(the last `SUPERVISED_FRACTION` of the text tokens) carries labels; prompt, image and padding are
-100. Batches are right-padded to their longest sample and `attention_mask` comes from lengths.
Token ids are random regular BPE ids: a step's cost does not depend on which ids they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dataset.conversation import IGNORE_INDEX

PAD_TOKEN_ID = 151643  # <|endoftext|>, Qwen's padding token
REGULAR_VOCAB = 151643  # ids below this are ordinary BPE tokens (never the image placeholder)
SUPERVISED_FRACTION = 0.3  # the assistant's share of a sample's text tokens
HEADER_TOKENS = 5  # text before the image (system / user header)
CAPTION_SHARE = 0.4  # stage-1-like short captions; the rest are instruction turns


def llava_like_lengths(n: int, seed: int) -> list[int]:
    """Text lengths (tokens, image excluded) of `n` samples drawn like a LLaVA-665K mix.

    40% short captions, uniform in [20, 80]; 60% instruction turns, log-normal with a median of
    about 250 tokens and a long tail, clipped to [80, 1200].
    """
    rng = np.random.default_rng(seed)
    captions = rng.integers(20, 81, size=n)
    turns = np.clip(rng.lognormal(mean=math.log(250.0), sigma=0.8, size=n), 80, 1200)
    is_caption = rng.random(n) < CAPTION_SHARE
    return [
        int(c if short else round(t))
        for c, t, short in zip(captions, turns, is_caption, strict=True)
    ]


def build_batch(
    text_lengths: list[int],
    *,
    num_image_tokens: int,
    image_size: int,
    max_length: int,
    image_token_id: int,
    generator: torch.Generator,
    supervised_fraction: float = SUPERVISED_FRACTION,
) -> dict[str, torch.Tensor]:
    """One right-padded batch: input_ids, attention_mask, labels `[B, T]`, pixel_values; the
    last `supervised_fraction` of each sample's text tokens carry labels."""
    batch = text_batch(
        text_lengths,
        image_tokens=[num_image_tokens] * len(text_lengths),
        max_length=max_length,
        image_token_id=image_token_id,
        generator=generator,
        supervised_fraction=supervised_fraction,
    )
    pixel_values = torch.randn(
        (len(text_lengths), 3, image_size, image_size), generator=generator
    )  # [B, 3, H, W]
    return {**batch, "pixel_values": pixel_values}


def text_batch(
    text_lengths: list[int],
    *,
    image_tokens: list[int],
    max_length: int,
    image_token_id: int,
    generator: torch.Generator,
    supervised_fraction: float = SUPERVISED_FRACTION,
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels `[B, T]` of samples with one image each: row i holds
    `image_tokens[i]` placeholders after the header, its text cut to fit `max_length`."""
    longest = max(image_tokens)
    if max_length < longest + HEADER_TOKENS + 2:
        raise ValueError(
            f"--max_length {max_length} leaves no room for text around the "
            f"{longest} image tokens; use at least {longest + HEADER_TOKENS + 2}"
        )
    texts = [min(n, max_length - k) for n, k in zip(text_lengths, image_tokens, strict=True)]
    lengths = [text + k for text, k in zip(texts, image_tokens, strict=True)]
    batch, width = len(lengths), max(lengths)
    input_ids = torch.full((batch, width), PAD_TOKEN_ID, dtype=torch.long)  # [B, T]
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
    rows = zip(texts, lengths, image_tokens, strict=True)
    for row, (text, length, tokens) in enumerate(rows):  # a few rows, not tokens
        input_ids[row, :length] = torch.randint(0, REGULAR_VOCAB, (length,), generator=generator)
        header = min(HEADER_TOKENS, text - 1)
        input_ids[row, header : header + tokens] = image_token_id
        answer = max(1, math.ceil(supervised_fraction * text))
        labels[row, length - answer : length] = input_ids[row, length - answer : length]
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def synthetic_batches(
    count: int,
    batch_size: int,
    *,
    num_image_tokens: int,
    image_size: int,
    max_length: int,
    image_token_id: int,
    seed: int,
    full_length: bool = False,
    supervised_fraction: float = SUPERVISED_FRACTION,
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of `batch_size` samples; the same seed gives the same batches.

    `full_length`: every sample fills `max_length` (no padding), instead of the LLaVA-like mix.
    """
    if full_length:
        lengths = [max_length - num_image_tokens] * (count * batch_size)
    else:
        lengths = llava_like_lengths(count * batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    return [
        build_batch(
            lengths[i * batch_size : (i + 1) * batch_size],
            num_image_tokens=num_image_tokens,
            image_size=image_size,
            max_length=max_length,
            image_token_id=image_token_id,
            generator=generator,
            supervised_fraction=supervised_fraction,
        )
        for i in range(count)
    ]


def batch_stats(
    batch: dict[str, torch.Tensor], image_token_id: int | None = None
) -> dict[str, int | float | list[int]]:
    """Non-padding tokens, supervised (next-token) targets, sequence lengths, padding fraction,
    the images the tower encodes (AnyRes: every tile), placeholders (given `image_token_id`)."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    tokens = int(sum(lengths))
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {
        "tokens": tokens,
        "supervised_tokens": supervised,
        "sequence_lengths": [int(n) for n in lengths],
        "padding_fraction": 1.0 - tokens / mask.numel(),
        "tower_images": int(batch["pixel_values"].shape[0]),
        "image_tokens": None
        if image_token_id is None
        else int((batch["input_ids"] == image_token_id).sum()),
    }
