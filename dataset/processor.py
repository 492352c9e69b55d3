"""The processor seam: text + images -> token ids, labels and pixel tensors, in one object.

`VLMProcessor` holds the tokenizer (`qwen/` owns it), the placeholder id (read from the model
config), the image processor (`visual.processing.ImageProcessor`, which owns preprocessing and
how many tokens an image of a given size becomes) and the default system prompt. The dataset,
`InferenceSession` (hence `test.py`, evaluation, the web chat and the API server) and
`dataprocess stats` render conversations through it, so a placeholder run always has the length
the model will produce feature rows for. Nobody else computes a token count.

- `encode(roles, contents, image_sizes)` -> `EncodedConversation` (ids + labels, training);
- `prompt_ids(roles, contents, image_sizes)` -> the generation prompt (inference);
- `image_inputs(images)` -> {"pixel_values", "image_sizes"} as the model reads them.

`image_sizes` are (height, width) of the decoded images (EXIF orientation applied), one per
`<image>` marker in order. A fixed-grid processor (`fixed_num_image_tokens` set) may be asked
without them: every image has the same count, and the ids are those of a plain int count.
`dataset/` never imports `visual/`: the image processor arrives as an object with that protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dataset.conversation import (
    DEFAULT_SYSTEM_PROMPT,
    ChatBlocks,
    EncodedConversation,
    encode_conversation,
    encode_prompt,
)

ImageSizes = Sequence[tuple[int, int]] | torch.Tensor  # [n_img, 2] (height, width)


@dataclass(frozen=True)
class VLMProcessor:
    """Tokenizer + placeholder id + image processor + system prompt (module docstring)."""

    tokenizer: Any
    image_token_id: int
    image_processor: Any  # visual.processing.ImageProcessor
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    @property
    def fixed_num_image_tokens(self) -> int | None:
        """Tokens per image when the count does not depend on the size, else None."""
        return self.image_processor.fixed_num_image_tokens

    def image_token_counts(self, image_sizes: ImageSizes) -> list[int]:
        """Placeholder ids per image, in order, for (height, width) sizes."""
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        return [int(self.image_processor.num_image_tokens(tuple(size))) for size in sizes]

    def _counts(self, image_sizes: ImageSizes | None) -> int | list[int]:
        if image_sizes is not None:
            return self.image_token_counts(image_sizes)
        fixed = self.fixed_num_image_tokens
        if fixed is None:
            raise ValueError(
                "the image processor's token count depends on the image size: pass image_sizes"
            )
        return fixed

    def encode(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        image_sizes: ImageSizes | None = None,
        *,
        system_prompt: str | None = None,
        blocks: ChatBlocks | None = None,
    ) -> EncodedConversation:
        """A training sample: ids and labels (`dataset.conversation.encode_conversation`)."""
        return encode_conversation(
            self.tokenizer,
            roles,
            contents,
            image_token_id=self.image_token_id,
            num_image_tokens=self._counts(image_sizes),
            system_prompt=system_prompt or self.system_prompt,
            blocks=blocks,
        )

    def prompt_ids(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        image_sizes: ImageSizes | None = None,
        system_prompt: str | None = None,
        *,
        blocks: ChatBlocks | None = None,
    ) -> list[int]:
        """The generation prompt of a conversation ending with a user turn (`encode_prompt`);
        also the prompt a preference pair's answers follow."""
        return encode_prompt(
            self.tokenizer,
            roles,
            contents,
            image_token_id=self.image_token_id,
            num_image_tokens=self._counts(image_sizes),
            system_prompt=system_prompt or self.system_prompt,
            blocks=blocks,
        )

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Decoded images -> `pixel_values` (the image processor's batch) and `image_sizes`
        `[n_img, 2]` long (height, width)."""
        return {
            "pixel_values": self.image_processor.pixel_values(images),
            "image_sizes": image_sizes_of(images),
        }


def image_sizes_of(images: Sequence[Image.Image]) -> torch.Tensor:
    """`[n_img, 2]` long tensor of (height, width) of decoded images."""
    sizes = [(image.height, image.width) for image in images]
    return torch.tensor(sizes, dtype=torch.long).reshape(len(images), 2)
