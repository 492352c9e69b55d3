"""Each round's inputs for each implementation: the same samples, as its own processor gives them.

The fixed grid's inputs are one batch for both (bench/batches.py). AnyRes batches carry the
samples of bench/batches.py with real images of several sizes:

Every sample carries one random-pixel image whose (height, width) is drawn from `IMAGE_SHAPES`
(in half tiles: wide, tall, square, extreme, larger than every pinpoint), so the images pick
different grids and the unpadding removes feature rows for some and columns for others. Its
placeholder run is our processor's count for that size (`AnyResImageProcessor.num_image_tokens`).
- ours: `pixel_values` [sum of 1 + tiles, 3, S, S] (all tiles, image after image) and
  `image_sizes` [B, 2], as the training collator gives them;
- the reference: what `LlavaNextProcessor`'s image processor returns for the same images (the one
  `python -m runtime.export` writes, runtime/export/llava_next.py): `pixel_values`
  [B, most tiles, 3, S, S] zero-padded, and `image_sizes` [B, 2].
Text, labels and masks are the same tensors for both.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bench.batches import SUPERVISED_FRACTION, llava_like_lengths, synthetic_batches, text_batch
from bench.presets import ScalePreset
from model.vlm import VisionLanguageModel
from runtime.export.llava_next import llava_next_image_processor

# (height, width) in half tiles: 3:5 and 5:3 (rows / columns unpadded), 7:4, 1:3 and 3:1 (thin
# strips), square, 9:7 (larger than the 2x2 pinpoint), 2:9 (wider than 1x3)
IMAGE_SHAPES = ((3, 5), (5, 3), (7, 4), (1, 3), (3, 1), (4, 4), (9, 7), (2, 9))


def random_images(count: int, tile_size: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` RGB noise images, their shapes drawn from `IMAGE_SHAPES` scaled to `tile_size`."""
    half = max(1, tile_size // 2)
    shapes = rng.integers(0, len(IMAGE_SHAPES), size=count)
    images = []
    for index in shapes:  # one PIL image per sample
        height, width = (half * n for n in IMAGE_SHAPES[index])
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def anyres_batch(
    text_lengths: list[int],
    images: list[Image.Image],
    *,
    vlm: VisionLanguageModel,
    reference_processor,
    max_length: int,
    generator: torch.Generator,
    supervised_fraction: float = SUPERVISED_FRACTION,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"ours": batch, "reference": batch}: the same samples, each side's image inputs."""
    processor = vlm.image_processor
    sizes = [(image.height, image.width) for image in images]
    text = text_batch(
        text_lengths,
        image_tokens=[processor.num_image_tokens(size) for size in sizes],
        max_length=max_length,
        image_token_id=vlm.image_token_id,
        generator=generator,
        supervised_fraction=supervised_fraction,
    )
    ours = {
        **text,
        "pixel_values": processor.pixel_values(images),  # [sum of 1 + tiles, 3, S, S]
        "image_sizes": torch.tensor(sizes, dtype=torch.long),  # [B, 2]
    }
    theirs = reference_processor(images, return_tensors="pt")
    reference = {
        **text,
        "pixel_values": theirs["pixel_values"],  # [B, most tiles, 3, S, S]
        "image_sizes": theirs["image_sizes"],  # [B, 2]
    }
    return {"ours": ours, "reference": reference}


def anyres_batches(
    count: int,
    batch_size: int,
    *,
    vlm: VisionLanguageModel,
    max_length: int,
    seed: int,
    full_length: bool = False,
    supervised_fraction: float = SUPERVISED_FRACTION,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """`count` paired batches of `batch_size` samples (`anyres_batch`); the same seed gives the
    same batches. `full_length`: every sample is cut at `max_length`."""
    samples = count * batch_size
    lengths = [max_length] * samples if full_length else llava_like_lengths(samples, seed)
    rng = np.random.default_rng(seed)
    images = random_images(samples, vlm.projector.geometry.tile_size, rng)
    reference_processor = llava_next_image_processor(vlm)
    generator = torch.Generator().manual_seed(seed)
    return [
        anyres_batch(
            lengths[i * batch_size : (i + 1) * batch_size],
            images[i * batch_size : (i + 1) * batch_size],
            vlm=vlm,
            reference_processor=reference_processor,
            max_length=max_length,
            generator=generator,
            supervised_fraction=supervised_fraction,
        )
        for i in range(count)
    ]


def paired_batches(
    vlm: VisionLanguageModel,
    count: int,
    batch_size: int,
    *,
    max_length: int,
    seed: int,
    preset: ScalePreset,
    image_aspect_ratio: str = "pad",
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """One {impl: inputs} per round (`anyres_batches` for "anyres"); the fixed grid's inputs
    are one batch, shared by both implementations."""
    shape = {"full_length": preset.full_length, "supervised_fraction": preset.supervised_fraction}
    if image_aspect_ratio == "anyres":
        return anyres_batches(count, batch_size, vlm=vlm, max_length=max_length, seed=seed, **shape)
    batches = synthetic_batches(
        count,
        batch_size,
        num_image_tokens=vlm.num_image_tokens,
        image_size=vlm.vision.image_size,
        max_length=max_length,
        image_token_id=vlm.image_token_id,
        seed=seed,
        **shape,
    )
    return [{"ours": batch, "reference": batch} for batch in batches]


def on_device(pair: dict[str, dict], device: torch.device) -> dict[str, dict]:
    """Each impl's inputs on `device`; a batch shared by both is moved once and stays shared."""
    moved: dict[int, dict] = {}
    for batch in pair.values():
        if id(batch) not in moved:
            moved[id(batch)] = {k: v.to(device) for k, v in batch.items()}
    return {impl: moved[id(batch)] for impl, batch in pair.items()}
