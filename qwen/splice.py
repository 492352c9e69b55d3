"""The one image splice of the project: image feature rows replace placeholder-token embeddings.

The data pipeline expands every image placeholder to N copies of `image_token_id`, so the number
of placeholder positions in a batch must equal the number of image feature rows. Any LLM that is
not QWen receives the result through `inputs_embeds`.
"""

from __future__ import annotations

import torch


def splice_image_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor | None,
    image_features: torch.Tensor | None,
    image_token_id: int,
) -> torch.Tensor:
    """Return a copy of `inputs_embeds [B, T, H]` with image rows at the placeholder positions.

    `image_features` is `[n_img, N, H]` or `[M, H]`; its rows (flattened, in order) go to the
    positions where `input_ids == image_token_id`, in row-major (batch, then time) order.
    `image_features=None` means no images: then there must be no placeholders either.
    Gradients flow to `image_features` (and to `inputs_embeds` at the other positions).

    Raises:
        ValueError: `input_ids` is missing, shapes disagree, or the number of placeholder
            positions differs from the number of image feature rows.
    """
    if input_ids is None:
        raise ValueError(
            "splice_image_features: image_features were given without input_ids, so the "
            f"placeholder positions (image_token_id={image_token_id}) cannot be found."
        )
    if input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"splice_image_features: input_ids shape {tuple(input_ids.shape)} does not match "
            f"inputs_embeds shape {tuple(inputs_embeds.shape)} in its first two dims."
        )
    hidden_size = inputs_embeds.shape[-1]
    if image_features is None:
        image_features = inputs_embeds.new_zeros(0, hidden_size)  # [0, H]: no images
    if image_features.ndim not in (2, 3) or image_features.shape[-1] != hidden_size:
        raise ValueError(
            f"splice_image_features: image_features must be [n_img, N, {hidden_size}] or "
            f"[M, {hidden_size}], got {tuple(image_features.shape)}."
        )
    rows = image_features.reshape(-1, hidden_size)  # [M, H]
    placeholder = input_ids == image_token_id  # [B, T]
    num_positions = int(placeholder.sum())
    if num_positions != rows.shape[0]:
        raise ValueError(
            f"splice_image_features: input_ids contain {num_positions} placeholder positions "
            f"(image_token_id={image_token_id}) but there are {rows.shape[0]} image feature rows "
            f"(image_features shape {tuple(image_features.shape)})."
        )
    if num_positions == 0 and not rows.requires_grad:
        return inputs_embeds  # (zero rows that need gradients still join the graph below)
    rows = rows.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    # masked_scatter fills True positions in row-major order, which is the order of the rows.
    mask = placeholder.unsqueeze(-1).expand_as(inputs_embeds)  # [B, T, H]
    return inputs_embeds.masked_scatter(mask, rows)
