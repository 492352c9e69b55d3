"""Projectors: shapes, gradients, the resampler's fixed output count, and config errors."""

from __future__ import annotations

import pytest
import torch

from model.projector import MLPProjector, build_projector
from model.resampler import Resampler, resize_positions, sincos_2d

DV, DL = 48, 64


def test_mlp2x_gelu_shapes_and_gradients():
    projector = build_projector("mlp2x_gelu", DV, DL, num_patches=16)
    assert isinstance(projector, MLPProjector)
    assert projector.num_output_tokens == 16
    layers = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(DV, DL), (DL, DL)]
    features = torch.randn(3, 16, DV, requires_grad=True)
    out = projector(features)
    assert out.shape == (3, 16, DL)
    out.square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


@pytest.mark.parametrize("num_patches", [16, 49, 576])
def test_resampler_gives_its_query_count_for_any_square_grid(num_patches: int):
    projector = build_projector("resampler", DV, DL, num_patches=16, num_queries=9)
    assert projector.num_output_tokens == 9
    features = torch.randn(2, num_patches, DV, requires_grad=True)
    out = projector(features)
    assert out.shape == (2, 9, DL)
    out.square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    without_grad = [name for name, p in projector.named_parameters() if p.grad is None]
    assert without_grad == []


def test_resampler_defaults_follow_qwen_vl():
    projector = build_projector("resampler", DV, 256, num_patches=1024)
    assert projector.num_output_tokens == 256
    assert projector.attn.num_heads == 2  # 128-wide heads
    assert projector.kv_proj.bias is None and projector.proj.bias is None
    assert "pos_embed" not in projector.state_dict()  # fixed table, rebuilt on construction


def test_resampler_images_are_independent_and_order_matters():
    torch.manual_seed(0)
    projector = Resampler(DV, DL, num_patches=16, num_queries=4).eval()
    features = torch.randn(2, 16, DV)
    both = projector(features)
    assert torch.allclose(both[1:], projector(features[1:]), atol=1e-6)
    # Positions enter the keys, so shuffling the patches changes the result.
    shuffled = features[:, torch.randperm(16)]
    assert not torch.allclose(projector(shuffled), both, atol=1e-4)


def test_resampler_rejects_non_square_inputs_and_settings():
    projector = build_projector("resampler", DV, DL, num_patches=16, num_queries=4)
    with pytest.raises(ValueError, match="N=15"):
        projector(torch.randn(1, 15, DV))
    with pytest.raises(ValueError, match="square number, got 10"):
        build_projector("resampler", DV, DL, num_patches=16, num_queries=10)
    with pytest.raises(ValueError, match="num_heads=3"):
        build_projector("resampler", DV, DL, num_patches=16, num_queries=4, num_heads=3)


def test_sincos_table_and_resizing():
    table = sincos_2d(32, 4)
    assert table.shape == (16, 32)
    assert torch.cdist(table, table).fill_diagonal_(1.0).min() > 0.1  # every position distinct
    # Row positions in the first half: cells in one row share it, cells in one column do not.
    assert torch.equal(table[0, :16], table[3, :16]) and not torch.equal(
        table[0, :16], table[4, :16]
    )
    assert torch.equal(resize_positions(table, 16), table)  # to 16 tokens: unchanged
    assert resize_positions(table, 49).shape == (49, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)


def test_unknown_kind_and_option_are_named():
    with pytest.raises(ValueError, match="'qformer'.*mlp2x_gelu, resampler"):
        build_projector("qformer", DV, DL, num_patches=16)
    with pytest.raises(ValueError, match="num_queries"):
        build_projector("mlp2x_gelu", DV, DL, num_patches=16, num_queries=4)
    with pytest.raises(ValueError, match="depth"):
        build_projector("resampler", DV, DL, num_patches=16, depth=2)
