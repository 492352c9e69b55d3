"""Tests of qwen.splice.splice_image_features: placement, order, errors, gradients."""

from __future__ import annotations

import pytest
import torch

from qwen.splice import splice_image_features

IMAGE_ID = 7
HIDDEN = 8


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Two samples; sample 0 holds one image (3 slots), sample 1 two images (3 slots each).
    input_ids = torch.tensor(
        [
            [1, IMAGE_ID, IMAGE_ID, IMAGE_ID, 2, 3, 0, 0, 0, 0],
            [4, IMAGE_ID, IMAGE_ID, IMAGE_ID, 5, IMAGE_ID, IMAGE_ID, IMAGE_ID, 6, 0],
        ]
    )
    embeds = torch.randn(2, 10, HIDDEN)
    return input_ids, embeds


def test_rows_land_at_placeholders_in_order_and_nowhere_else() -> None:
    input_ids, embeds = _batch()
    features = torch.randn(3, 3, HIDDEN)  # 3 images x 3 rows
    out = splice_image_features(embeds, input_ids, features, IMAGE_ID)

    placeholder = input_ids == IMAGE_ID
    torch.testing.assert_close(out[~placeholder], embeds[~placeholder], rtol=0, atol=0)
    rows = features.reshape(-1, HIDDEN)
    torch.testing.assert_close(out[0, 1:4], rows[0:3], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 1:4], rows[3:6], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 5:8], rows[6:9], rtol=0, atol=0)
    # A new tensor: the input embeddings are untouched.
    assert not torch.equal(out, embeds)
    assert not torch.equal(embeds[placeholder], rows)


def test_flat_rows_equal_three_dim_features() -> None:
    input_ids, embeds = _batch()
    features = torch.randn(3, 3, HIDDEN)
    flat = splice_image_features(embeds, input_ids, features.reshape(9, HIDDEN), IMAGE_ID)
    nested = splice_image_features(embeds, input_ids, features, IMAGE_ID)
    assert torch.equal(flat, nested)


def test_count_mismatch_names_both_counts() -> None:
    input_ids, embeds = _batch()
    with pytest.raises(ValueError, match=r"9 placeholder positions.*12 image feature rows"):
        splice_image_features(embeds, input_ids, torch.randn(4, 3, HIDDEN), IMAGE_ID)


def test_missing_input_ids_is_a_clear_error() -> None:
    _, embeds = _batch()
    with pytest.raises(ValueError, match="without input_ids"):
        splice_image_features(embeds, None, torch.randn(9, HIDDEN), IMAGE_ID)


def test_wrong_hidden_size_is_a_clear_error() -> None:
    input_ids, embeds = _batch()
    with pytest.raises(ValueError, match="image_features must be"):
        splice_image_features(embeds, input_ids, torch.randn(9, HIDDEN + 1), IMAGE_ID)


def test_gradient_reaches_image_features_and_text_embeddings() -> None:
    input_ids, embeds = _batch()
    embeds.requires_grad_(True)
    features = torch.randn(3, 3, HIDDEN, requires_grad=True)
    weights = torch.randn(2, 10, HIDDEN)
    (splice_image_features(embeds, input_ids, features, IMAGE_ID) * weights).sum().backward()

    placeholder = input_ids == IMAGE_ID
    torch.testing.assert_close(features.grad.reshape(-1, HIDDEN), weights[placeholder])
    assert torch.all(embeds.grad[placeholder] == 0)
    torch.testing.assert_close(embeds.grad[~placeholder], weights[~placeholder])


def test_dtype_follows_embeddings() -> None:
    input_ids, embeds = _batch()
    out = splice_image_features(
        embeds.bfloat16(), input_ids, torch.randn(9, HIDDEN, dtype=torch.float32), IMAGE_ID
    )
    assert out.dtype == torch.bfloat16
