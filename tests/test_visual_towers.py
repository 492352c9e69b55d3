"""Vision towers: tiny random checkpoints of every backend, and token counts at real sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from demo.tiny_towers import (
    register_tiny_timm_siglip,
    save_tiny_clip_tower,
    save_tiny_open_clip_tower,
    save_tiny_siglip_tower,
)
from visual import VisionTower, load_vision_tower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def towers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("towers")
    save_tiny_clip_tower(root / "clip")
    save_tiny_clip_tower(root / "clip_full", full_model=True, seed=1)
    save_tiny_siglip_tower(root / "siglip", image_size=48, patch_size=16)
    save_tiny_siglip_tower(root / "siglip_full", full_model=True, seed=2)
    save_tiny_open_clip_tower(root / "oc_vit")
    save_tiny_open_clip_tower(root / "oc_siglip", kind="siglip")
    return root


CASES = {
    # name: (library, expected tokens, hidden size)
    "clip": ("transformers", 16, 64),
    "clip_full": ("transformers", 16, 64),
    "siglip": ("transformers", 9, 64),
    "siglip_full": ("transformers", 16, 64),
    "oc_vit": ("open_clip", 16, 64),
    "oc_siglip": ("open_clip", 16, 64),
}


def _pixels(tower: VisionTower, n: int = 2) -> torch.Tensor:
    images = [Image.new("RGB", (40 + 7 * i, 30), (30 * i, 90, 200)) for i in range(n)]
    return tower.preprocess(images)


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_and_token_count(towers_dir: Path, name: str):
    library, tokens, hidden = CASES[name]
    tower = load_vision_tower(str(towers_dir / name), library=library)
    features = tower(_pixels(tower, 3))
    assert features.shape == (3, tokens, hidden)
    assert tower.num_image_tokens == features.shape[1] == tokens
    assert tower.hidden_size == hidden
    assert tower.settings["library"] == library


@pytest.mark.parametrize("name", list(CASES))
def test_tower_is_frozen_inside_a_training_model(towers_dir: Path, name: str):
    tower = load_vision_tower(str(towers_dir / name), library=CASES[name][0])
    model = nn.ModuleDict({"vision": tower, "head": nn.Linear(tower.hidden_size, 1)})
    model.train()
    assert model["head"].training
    assert not any(module.training for module in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())
    features = tower(_pixels(tower))
    assert not features.requires_grad
    model["head"](features).sum().backward()
    assert model["head"].weight.grad is not None
    assert all(p.grad is None for p in tower.parameters())


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_clip_features_are_hidden_states_without_cls(towers_dir: Path, layer: int):
    from transformers import CLIPVisionModel

    tower = load_vision_tower(str(towers_dir / "clip"), feature_layer=layer)
    reference = CLIPVisionModel.from_pretrained(towers_dir / "clip").eval()
    pixels = _pixels(tower)
    expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
    assert torch.equal(tower(pixels), expected)


def test_siglip_keeps_every_token(towers_dir: Path):
    from transformers import SiglipVisionModel

    tower = load_vision_tower(str(towers_dir / "siglip"))
    reference = SiglipVisionModel.from_pretrained(towers_dir / "siglip").eval()
    pixels = _pixels(tower)
    expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert expected.shape[1] == 9
    assert torch.equal(tower(pixels), expected)


@pytest.mark.parametrize(
    "name, full_class", [("clip_full", "CLIPModel"), ("siglip_full", "SiglipModel")]
)
def test_full_checkpoint_loads_its_trained_vision_weights(
    towers_dir: Path, name: str, full_class: str
):
    import transformers

    full = getattr(transformers, full_class).from_pretrained(towers_dir / name)
    tower = load_vision_tower(str(towers_dir / name))
    expected = full.vision_model.state_dict()
    loaded = tower.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_preprocessing_constants_come_from_the_checkpoint(towers_dir: Path):
    for name in ("clip", "siglip"):
        config = json.loads((towers_dir / name / "preprocessor_config.json").read_text())
        tower = load_vision_tower(str(towers_dir / name))
        assert tower.preprocessor.mean == tuple(config["image_mean"])
        assert tower.preprocessor.std == tuple(config["image_std"])
        assert tower.preprocessor.resample == config["resample"]
    siglip = load_vision_tower(str(towers_dir / "siglip"))
    assert siglip.image_size == 48 and siglip.preprocessor.crop_size is None
    oc = load_vision_tower(str(towers_dir / "oc_siglip"), library="open_clip")
    assert oc.preprocessor.mean == (0.5, 0.5, 0.5) and oc.preprocessor.resize_size == (32, 32)


def test_open_clip_vit_drops_the_class_token(towers_dir: Path):
    tower = load_vision_tower(str(towers_dir / "oc_vit"), library="open_clip")
    transformer = tower.model.transformer
    captured: list[torch.Tensor] = []
    handle = transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.append(o))
    pixels = _pixels(tower)
    features = tower(pixels)
    handle.remove()
    block_out = captured[0] if transformer.batch_first else captured[0].transpose(0, 1)
    assert block_out.shape[1] == 17  # class token + 16 patches
    assert torch.equal(features, block_out[:, 1:])


def test_open_clip_siglip_keeps_every_token(towers_dir: Path):
    register_tiny_timm_siglip()
    tower = load_vision_tower(str(towers_dir / "oc_siglip"), library="open_clip", feature_layer=-1)
    captured: list[torch.Tensor] = []
    handle = tower.model.trunk.blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    features = tower(_pixels(tower))
    handle.remove()
    assert torch.equal(features, captured[0])


def test_settings_rebuild_the_same_tower(towers_dir: Path):
    for name in ("clip", "oc_vit"):
        tower = load_vision_tower(
            str(towers_dir / name), library=CASES[name][0], image_aspect_ratio="pad"
        )
        rebuilt = load_vision_tower(**tower.settings)
        pixels = _pixels(tower)
        assert rebuilt.preprocessor == tower.preprocessor
        assert torch.equal(rebuilt(pixels), tower(pixels))


def test_user_mistakes_get_clear_errors(towers_dir: Path, tmp_path: Path):
    path = str(towers_dir / "clip")
    with pytest.raises(ValueError, match="feature_layer=3"):
        load_vision_tower(path, feature_layer=3)
    with pytest.raises(ValueError, match="feature_layer=0"):
        load_vision_tower(path, feature_layer=0)
    with pytest.raises(ValueError, match="library='timm'"):
        load_vision_tower(path, library="timm")
    with pytest.raises(ValueError, match="image_aspect_ratio='square'"):
        load_vision_tower(path, image_aspect_ratio="square")
    tower = load_vision_tower(path)
    with pytest.raises(ValueError, match=r"\[n, 3, 32, 32\]"):
        tower(torch.zeros(1, 3, 64, 64))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match="siglip2"):
        load_vision_tower(str(tmp_path))


def test_transformers_path_never_imports_open_clip_or_timm(towers_dir: Path):
    script = (
        "import sys\n"
        "from visual import load_vision_tower\n"
        f"tower = load_vision_tower({str(towers_dir / 'siglip')!r})\n"
        "tower(tower.preprocess([__import__('PIL.Image').Image.new('RGB', (5, 5))]))\n"
        "print(sorted(m for m in ('open_clip', 'timm') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# Real architectures, built on the meta device: no weights are allocated.
REAL_HF = {
    "clip-vit-large-patch14": ("clip", 224, 14, 1024, 24, 16, 4096, 256),
    "clip-vit-large-patch14-336": ("clip", 336, 14, 1024, 24, 16, 4096, 576),
    "siglip-so400m-patch14-384": ("siglip", 384, 14, 1152, 27, 16, 4304, 729),
}


@pytest.mark.parametrize("name", list(REAL_HF))
def test_real_transformers_sizes(name: str):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from visual.hf_tower import HFVisionTower, default_preprocessor

    family, image, patch, hidden, layers, heads, mlp, tokens = REAL_HF[name]
    config_class, model_class = (
        (CLIPVisionConfig, CLIPVisionModel)
        if family == "clip"
        else (SiglipVisionConfig, SiglipVisionModel)
    )
    config = config_class(
        image_size=image,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
    )
    with torch.device("meta"):
        model = model_class(config)
    tower = HFVisionTower(model, default_preprocessor(config, "resize"))
    assert tower.num_image_tokens == tokens
    assert tower.hidden_size == hidden
    assert tower.image_size == image
    features = tower(torch.zeros(1, 3, image, image, device="meta"))
    assert features.shape == (1, tokens, hidden)


REAL_OPEN_CLIP = {
    "ViT-L-14-336": (576, 1024),
    "ViT-bigG-14": (256, 1664),
    "ViT-SO400M-14-SigLIP-384": (729, 1152),
}


@pytest.mark.parametrize("name", list(REAL_OPEN_CLIP))
def test_real_open_clip_sizes(name: str):
    import open_clip

    from visual.open_clip_tower import OpenClipVisionTower, preprocessor_from_open_clip_cfg

    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    preprocessor = preprocessor_from_open_clip_cfg(open_clip.get_model_preprocess_cfg(model), "pad")
    tower = OpenClipVisionTower(model.visual, preprocessor)
    assert (tower.num_image_tokens, tower.hidden_size) == REAL_OPEN_CLIP[name]
