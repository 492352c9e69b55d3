"""The AnyRes training-step benchmark: ours and transformers' LLaVA-NeXT + peft built from the same
weights, each fed by its own processor, give the same first-step loss (what keeps the paired
timing a comparison of implementations, not of models)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from bench import train_step
from bench.models import prepare_models
from bench.paired_batches import anyres_batches
from bench.presets import PRESETS
from bench.reference_llava import trainable_image_path
from model.anyres import AnyResProjector
from model.config import LoraSettings

FLAGS = "--scale tiny --steps 1 --warmup 0 --batch_size 3 --max_length 120 --lora_rank 8 --peak_tflops 1"


@pytest.fixture(scope="module")
def built():
    models, vlm = prepare_models(
        PRESETS["tiny"],
        mode="lora",
        impls=["ours", "reference"],
        device="cpu",
        dtype=torch.float32,
        lora=LoraSettings(lora_rank=8),
        image_aspect_ratio="anyres",
    )
    return models, vlm, anyres_batches(2, 3, vlm=vlm, max_length=120, seed=3)


def test_both_sides_see_the_same_images_and_tokens(built):
    _, vlm, batches = built
    geometry = vlm.projector.geometry
    assert isinstance(vlm.projector, AnyResProjector)
    assert geometry.pinpoints == ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))  # training's
    sizes, counts = [], []
    for pair in batches:
        ours, theirs = pair["ours"], pair["reference"]
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
        tiles = [geometry.num_tiles(tuple(size)) for size in ours["image_sizes"].tolist()]
        assert theirs["pixel_values"].shape[:2] == (len(tiles), max(tiles))
        unpadded = torch.cat([pv[:n] for pv, n in zip(theirs["pixel_values"], tiles, strict=True)])
        assert (unpadded - ours["pixel_values"]).abs().max() < 1e-5  # the same pixels, tiled
        placeholders = (ours["input_ids"] == vlm.image_token_id).sum(dim=1)
        sizes += [tuple(size) for size in ours["image_sizes"].tolist()]
        counts += placeholders.tolist()
    windows = [geometry.feature_window(size) for size in sizes]
    assert any(top > 0 for top, *_ in windows)  # feature rows unpadded
    assert any(left > 0 for _, _, left, _ in windows)  # feature columns unpadded
    assert counts == [geometry.num_image_tokens(size) for size in sizes]
    assert len(set(counts)) >= 3  # the tokens per image vary with its size


def image_path_gradients(model, params, batch) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The loss, and the gradients of `params` (the projector's first linear, image_newline):
    the loss of a tiny random LLM barely depends on the images, these do on every image row."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), *(param.grad.clone() for param in params)


def test_the_reference_is_llava_next_and_gives_our_loss_and_gradients(built):
    models, vlm, batches = built
    reference = models["reference"]
    assert isinstance(reference.get_base_model(), LlavaNextForConditionalGeneration)
    assert all(p.requires_grad for p in trainable_image_path(reference))
    their_projector, *_, their_newline = trainable_image_path(reference)
    our_params = (vlm.projector.linear_1.weight, vlm.projector.image_newline)
    for pair in batches:
        ours = image_path_gradients(models["ours"], our_params, pair["ours"])
        theirs = image_path_gradients(
            reference, (their_projector, their_newline), pair["reference"]
        )
        assert ours[0] > 1.0 and abs(ours[0] - theirs[0]) <= 1e-5 * ours[0]
        for mine, other in zip(ours[1:], theirs[1:], strict=True):
            assert other.abs().max() > 0
            assert (mine - other).abs().max() <= 1e-4 * other.abs().max()


def test_the_anyres_benchmark_runs_and_agrees_on_the_first_loss(tmp_path):
    out = tmp_path / "anyres.json"
    train_step.main([*FLAGS.split(), "--image_aspect_ratio", "anyres", "--out", str(out)])
    results = json.loads(out.read_text())
    ours = results["impls"]["ours"]["first_loss"]
    assert results["config"]["image_aspect_ratio"] == "anyres"
    assert results["first_loss_max_abs_diff"] <= 1e-5 * ours
    assert results["batches"]["image_tokens_per_sample"] > 16  # more than the fixed grid's
    assert results["batches"]["tower_images_per_step"] > 3  # tiles, not images
    assert results["ratio_step_time"] > 0 and results["ratio_peak_memory"] > 0


def test_bad_pinpoints_are_refused_naming_the_flag():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--image_grid_pinpoints", "[[32, 64]]"])  # fixed grid
    with pytest.raises(ValueError, match="--image_grid_pinpoints: \\[32, 48\\]"):
        flags = ["--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "[[32, 48]]"]
        train_step.main([*FLAGS.split(), *flags])
