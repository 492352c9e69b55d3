"""Qwen-VL's visual encoder as a tower: loading from the release layout (only the visual tensors),
the real config's size, numerical parity with an independent functional reference written from
the facts of Qwen-VL's visual.py (the tower's code is not reused), each known trap caught by that
check, preprocessing, bad input, extraction, and a whole run (feature cache, training, merge,
test.py) on the tiny fixtures."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import train_flags
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from demo.tiny_towers import TINY_QWEN_VL, save_tiny_qwen_vl
from identity.fingerprint import module_fingerprint
from visual import load_vision_tower
from visual.feature_cache import tower_cache_settings
from visual.qwen_vl import extract
from visual.qwen_vl import main as qwen_vl_main
from visual.qwen_vl_checkpoint import PREFIX, QwenVLVisualConfig
from visual.qwen_vl_tower import QwenVLVisionTower, QwenVLVisual, qwen_vl_preprocessor

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-5  # fp32, as the spec recommends for tiny configs; catches traps 1-5

# config.json -> "visual" of Qwen-VL and Qwen-VL-Chat (spec section 1).
REAL_VISUAL = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}


def spec_tensor_shapes(width, layers, mlp, dim, queries) -> dict[str, tuple[int, ...]]:
    """Spec section 2, written out by hand (names without `transformer.visual.`)."""
    shapes = {
        "conv1.weight": (width, 3, 14, 14),
        "positional_embedding": (256, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
        "attn_pool.query": (queries, dim),
        "attn_pool.pos_embed": (queries, dim),
        "attn_pool.kv_proj.weight": (dim, width),
        "attn_pool.ln_q.weight": (dim,),
        "attn_pool.ln_q.bias": (dim,),
        "attn_pool.ln_kv.weight": (dim,),
        "attn_pool.ln_kv.bias": (dim,),
        "attn_pool.attn.in_proj_weight": (3 * dim, dim),
        "attn_pool.attn.in_proj_bias": (3 * dim,),
        "attn_pool.attn.out_proj.weight": (dim, dim),
        "attn_pool.attn.out_proj.bias": (dim,),
        "ln_post.weight": (dim,),
        "ln_post.bias": (dim,),
        "proj": (dim, dim),
    }
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        shapes |= {
            block + "ln_1.weight": (width,),
            block + "ln_1.bias": (width,),
            block + "attn.in_proj.weight": (3 * width, width),
            block + "attn.in_proj.bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width),
            block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,),
            block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width),
            block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp),
            block + "mlp.c_proj.bias": (width,),
        }
    return shapes


# ---------------------------------------------------------------------------------------------
# An independent functional reference, written from the spec; `trap` plants one known mistake.
# ---------------------------------------------------------------------------------------------

TRAPS = (
    "in_proj_as_qkv_blocks",  # 1: the ViT's fused rows split like nn.MultiheadAttention
    "pool_in_proj_per_head",  # 1, reversed: the resampler's [Wq; Wk; Wv] read per head
    "proj_transposed",  # 2: x @ proj.T
    "bilinear_positions",  # 3: bilinear instead of bicubic position resize
    "nearest_positions",  # 3
    "quick_gelu",  # 4: OpenAI-CLIP's QuickGELU
    "tanh_gelu",  # 4: tanh-approximate GELU
    "layer_norm_eps_1e-5",  # 5
    "values_with_position",  # 7: values get the key positions too
    "column_major_tokens",  # 8: patches flattened column-major against row-major tables
    "causal_vit_mask",  # 9: a mask in the ViT attention
    "pool_heads_from_config",  # 10: resampler heads = `heads` instead of output_dim // 128
)


def ref_layer_norm(x, state, name, trap):
    eps = 1e-5 if trap == "layer_norm_eps_1e-5" else 1e-6
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def ref_gelu(x, trap):
    if trap == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if trap == "tanh_gelu":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_resize(table, tokens, trap):
    """[S*S, C] row-major -> [G*G, C] row-major, bicubic in float32 (spec section 4)."""
    source, target = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if source == target:
        return table
    mode = {"bilinear_positions": "bilinear", "nearest_positions": "nearest"}.get(trap, "bicubic")
    grid = table.reshape(source, source, -1).permute(2, 0, 1)[None].float()  # [1, C, S, S]
    options = {} if mode == "nearest" else {"align_corners": False}
    grid = F.interpolate(grid, size=(target, target), mode=mode, **options)[0]  # [C, G, G]
    return grid.permute(1, 2, 0).reshape(target * target, -1)


def ref_attention(q, k, v, causal=False):
    """q [B, h, Lq, d], k/v [B, h, Lk, d]: softmax(q k^T / sqrt(d)) v."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1) @ v


def ref_vit_block(x, state, n, heads, trap):
    p = f"transformer.resblocks.{n}."
    batch, tokens, width = x.shape
    h = ref_layer_norm(x, state, p + "ln_1", trap)
    weight, bias = state[p + "attn.in_proj.weight"], state[p + "attn.in_proj.bias"]
    head_dim = width // heads
    if trap == "in_proj_as_qkv_blocks":
        rows = [weight[i * width : (i + 1) * width] for i in range(3)]
        biases = [bias[i * width : (i + 1) * width] for i in range(3)]
    else:  # per head: [heads, (q, k, v), head_dim, width]
        rows = list(
            weight.reshape(heads, 3, head_dim, width).transpose(0, 1).reshape(3, width, width)
        )
        biases = list(bias.reshape(heads, 3, head_dim).transpose(0, 1).reshape(3, width))
    q, k, v = (
        (h @ w.T + b).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        for w, b in zip(rows, biases, strict=True)
    )
    out = ref_attention(q, k, v, causal=trap == "causal_vit_mask")
    out = out.transpose(1, 2).reshape(batch, tokens, width)
    x = x + out @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
    h = ref_layer_norm(x, state, p + "ln_2", trap)
    h = ref_gelu(h @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"], trap)
    return x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]


def ref_resampler(x, state, config, trap):
    p, dim = "attn_pool.", config["output_dim"]
    heads = config["heads"] if trap == "pool_heads_from_config" else dim // 128
    if config["width"] != dim:
        x = x @ state[p + "kv_proj.weight"].T
    kv = ref_layer_norm(x, state, p + "ln_kv", trap)  # [B, T, E]
    key_pos = ref_resize(state[p + "pos_embed"], x.shape[1], trap)
    query = ref_layer_norm(state[p + "query"], state, p + "ln_q", trap) + state[p + "pos_embed"]
    weight, bias = state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"]
    if trap == "pool_in_proj_per_head":
        weight = weight.reshape(heads, 3, dim // heads, dim).transpose(0, 1).reshape(3 * dim, dim)
        bias = bias.reshape(heads, 3, dim // heads).transpose(0, 1).reshape(3 * dim)
    inputs = (query, kv + key_pos, kv + key_pos if trap == "values_with_position" else kv)
    q, k, v = (
        (t @ weight[i * dim : (i + 1) * dim].T + bias[i * dim : (i + 1) * dim])
        .reshape(*t.shape[:-1], heads, dim // heads)
        .transpose(-2, -3)
        for i, t in enumerate(inputs)
    )
    out = ref_attention(q.expand(x.shape[0], -1, -1, -1), k, v)  # [B, h, Q, d]
    out = out.transpose(1, 2).reshape(x.shape[0], -1, dim)
    return out @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]


def reference_forward(state, config, pixels, trap=None, last_block=None):
    """Spec section 4: pixels [B, 3, S, S] -> [B, Q, E] (or block `last_block`'s [B, T, W])."""
    x = F.conv2d(pixels, state["conv1.weight"], stride=config["patch_size"])  # [B, W, G, G]
    if trap == "column_major_tokens":
        x = x.transpose(-1, -2)
    x = x.flatten(2).transpose(1, 2)  # [B, T, W]
    x = ref_layer_norm(
        x + ref_resize(state["positional_embedding"], x.shape[1], trap), state, "ln_pre", trap
    )
    for n in range(config["layers"]):
        x = ref_vit_block(x, state, n, config["heads"], trap)
        if n + 1 == last_block:
            return x
    x = ref_layer_norm(ref_resampler(x, state, config, trap), state, "ln_post", trap)
    return x @ (state["proj"].T if trap == "proj_transposed" else state["proj"])


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny tower in the release layout, sharded .bin and sharded .safetensors."""
    root = tmp_path_factory.mktemp("qwen-vl")
    return {
        fmt: save_tiny_qwen_vl(root / fmt, weights_format=fmt) for fmt in ("bin", "safetensors")
    }


def load(path, **options) -> QwenVLVisionTower:
    options = {"feature_layer": -1, "image_aspect_ratio": "resize", **options}
    return load_vision_tower(str(path), library="qwen_vl", **options)


def module_state(tower) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in tower.model.state_dict().items()}


def pixels_for(tower, n=2, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, 3, tower.image_size, tower.image_size)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_release_layout_loads_only_the_visual_tensors(release_dirs, fmt, tmp_path, caplog):
    source = release_dirs[fmt]
    copy = shutil.copytree(source, tmp_path / fmt)
    first = sorted(copy.glob(f"*-00001-of-*.{fmt}"))[0]
    first.write_bytes(b"not a weights file")  # holds only LM tensors: must never be opened
    with caplog.at_level(logging.INFO, logger="visual.qwen_vl_checkpoint"):
        tower = load(copy)
    config = QwenVLVisualConfig.from_dict(TINY_QWEN_VL, "tiny")
    expected = spec_tensor_shapes(32, 2, config.mlp_width, 256, 4)
    assert {k: tuple(v.shape) for k, v in tower.model.state_dict().items()} == expected
    assert "42 transformer.visual.* tensors; 2 other tensors" in caplog.text
    assert "were not loaded" in caplog.text
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in tower.parameters())
    assert (tower.num_image_tokens, tower.hidden_size, tower.image_size) == (4, 256, 56)


def test_real_config_on_the_meta_device():
    config = QwenVLVisualConfig.from_dict(REAL_VISUAL, "real")
    with torch.device("meta"):
        model = QwenVLVisual(config)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == spec_tensor_shapes(
        1664, 48, 8192, 4096, 256
    )
    assert len(state) == 594

    def count(prefix: str) -> int:
        return sum(v.numel() for k, v in state.items() if k.startswith(prefix))

    assert count("") == 1_935_610_624
    assert count("attn_pool.") == 76_054_528
    assert count("ln_post.") + count("proj") == 16_785_408
    assert count("") - count("attn_pool.") - count("ln_post.") - count("proj") == 1_842_770_688
    tower = QwenVLVisionTower(model, qwen_vl_preprocessor(448, "resize"))
    assert (tower.num_image_tokens, tower.hidden_size, tower.image_size) == (256, 4096, 448)
    patches = QwenVLVisionTower(model, qwen_vl_preprocessor(448, "resize"), feature_layer=-2)
    assert (patches.num_image_tokens, patches.hidden_size) == (1024, 1664)


GEOMETRIES = {
    # name: overrides of TINY_QWEN_VL (56 px: ViT table 16 -> 4, resampler keys 2 -> 4)
    "tiny_56px": {},
    "query_grid_28px": {"image_size": 28},  # grid 2 = query grid: keys not resized
    "table_grid_224px": {"image_size": 224},  # grid 16 = ViT table: not resized
    "real_geometry_448px": {"image_size": 448, "n_queries": 256, "layers": 1},  # 16 -> 32 both
    "no_kv_proj": {"width": 128, "output_dim": 128},  # width = output_dim: Identity, 1 head
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_matches_the_reference(name, tmp_path):
    section = {**TINY_QWEN_VL, **GEOMETRIES[name]}
    tower = load(save_tiny_qwen_vl(tmp_path / name, seed=3, num_shards=2, **GEOMETRIES[name]))
    pixels = pixels_for(tower)
    expected = reference_forward(module_state(tower), section, pixels)
    features = tower(pixels)
    assert features.shape == expected.shape == (2, section["n_queries"], section["output_dim"])
    assert (features - expected).abs().max().item() <= TOLERANCE
    patches = load(tower.settings["name_or_path"], feature_layer=-2)  # the last ViT block
    expected = reference_forward(module_state(tower), section, pixels, last_block=section["layers"])
    assert (patches(pixels) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("trap", TRAPS)
def test_each_trap_breaks_parity(release_dirs, trap):
    tower = load(release_dirs["bin"])
    pixels, state = pixels_for(tower), module_state(tower)
    features = tower(pixels)
    correct = reference_forward(state, TINY_QWEN_VL, pixels)
    trapped = reference_forward(state, TINY_QWEN_VL, pixels, trap=trap)
    assert (features - correct).abs().max().item() <= TOLERANCE
    assert (features - trapped).abs().max().item() > 10 * TOLERANCE, trap


def test_preprocessing_is_qwen_vls_own(release_dirs, caplog):
    from torchvision import transforms

    tower = load(release_dirs["bin"])
    original = transforms.Compose(  # Qwen-VL's `image_transform`
        [
            transforms.Resize((56, 56), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=tower.preprocessor.mean, std=tower.preprocessor.std),
        ]
    )
    generator = torch.Generator().manual_seed(0)
    images = [  # shrink, enlarge, keep, grey
        Image.fromarray(
            torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for h, w in ((90, 130), (20, 33), (56, 56))
    ]
    images.append(images[0].convert("L"))
    ours = tower.preprocess(images)
    theirs = torch.stack([original(image.convert("RGB")) for image in images])
    assert ours.shape == (4, 3, 56, 56)
    assert (ours - theirs).abs().max().item() <= 1e-6  # x * (1/255) vs x / 255: one float ulp

    with caplog.at_level(logging.WARNING, logger="visual.qwen_vl_tower"):
        padded = load(release_dirs["bin"], image_aspect_ratio="pad")
    assert "'pad' pads images to a square" in caplog.text
    letterbox = Image.new("RGB", (130, 130), padded.preprocessor.fill_color)
    letterbox.paste(images[0], (0, 20))
    assert (padded.preprocess(images[0]) - original(letterbox)).abs().max().item() <= 1e-6


def test_feature_layer_picks_the_resampler_or_a_vit_block(release_dirs):
    path = release_dirs["bin"]
    tower = load(path)
    pixels, state = pixels_for(tower), module_state(tower)
    for layer, block in ((-1, None), (3, None), (-2, 2), (2, 2), (-3, 1), (1, 1)):
        picked = load(path, feature_layer=layer)
        expected = reference_forward(state, TINY_QWEN_VL, pixels, last_block=block)
        assert (picked(pixels) - expected).abs().max().item() <= TOLERANCE, layer
        assert (picked.num_image_tokens, picked.hidden_size) == (
            (4, 256) if block is None else (16, 32)
        )
    for layer in (0, 4, -4):
        with pytest.raises(
            ValueError, match=f"feature_layer={layer} is out of range for the Qwen-VL"
        ):
            load(path, feature_layer=layer)
    with pytest.raises(ValueError, match="pretrained= applies to library='open_clip' only"):
        load(path, pretrained="openai")


def test_frozen_and_rebuilt_from_its_settings(release_dirs):
    tower = load(release_dirs["safetensors"])
    tower.train()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    pixels = pixels_for(tower)
    features = tower(pixels)
    assert not features.requires_grad
    rebuilt = load_vision_tower(**tower.settings)
    assert torch.equal(rebuilt(pixels), features)
    assert tower_cache_settings(tower) == {
        "weights": module_fingerprint(tower)["all"],
        "library": "qwen_vl",
        "name_or_path": str(release_dirs["safetensors"].resolve()),
        "pretrained": None,
        "feature_layer": -1,
        "image_aspect_ratio": "resize",
        "num_image_tokens": 4,
        "hidden_size": 256,
        "image_size": 56,
    }


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error naming the file and the tensor.
# ---------------------------------------------------------------------------------------------


def _index(path: Path) -> tuple[Path, dict]:
    file = next(path.glob("*.index.json"))
    return file, json.loads(file.read_text())


def _rewrite_shard(shard: Path, change) -> None:
    if shard.suffix == ".bin":
        state = torch.load(shard, weights_only=True)
        change(state)
        torch.save(state, shard)
    else:
        state = load_file(shard)
        change(state)
        save_file(state, str(shard))


def no_config(path):
    (path / "config.json").unlink()
    return FileNotFoundError, "no config.json"


def no_visual_section(path):
    (path / "config.json").write_text(json.dumps({"model_type": "qwen", "hidden_size": 64}))
    return ValueError, r"config.json: no 'visual' section"


def incomplete_visual_section(path):
    config = json.loads((path / "config.json").read_text())
    del config["visual"]["width"]
    (path / "config.json").write_text(json.dumps(config))
    return ValueError, r"config.json: the 'visual' section has no 'width'"


def no_visual_tensors(path):
    index, data = _index(path)
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith(PREFIX)}
    index.write_text(json.dumps(data))
    return ValueError, r"index.json: lists no transformer.visual.\* tensors"


def only_language_model_weights(path):
    for file in [*path.glob("*.bin"), *path.glob("*.json")]:
        if file.name != "config.json":
            file.unlink()
    save_file({"transformer.wte.weight": torch.zeros(4, 4)}, str(path / "model.safetensors"))
    return (
        ValueError,
        r"model.safetensors\): not the visual encoder .*: "
        r"missing transformer.visual.positional_embedding and 41 more",
    )


def missing_shard(path):
    shard = next(path.glob("*-00002-of-00003.*"))
    shard.unlink()
    return (
        FileNotFoundError,
        rf"{shard.name}: listed in .*index.json as holding transformer.visual\.",
    )


def damaged_shard(path):
    shard = next(path.glob("*-00003-of-00003.*"))
    shard.write_bytes(b"\x00" * 64)
    return ValueError, rf"{shard.name}: damaged or not a"


def wrong_shape(path):
    shard = next(path.glob("*-00003-of-00003.*"))
    name = PREFIX + "transformer.resblocks.1.mlp.c_fc.weight"
    assert _index(path)[1]["weight_map"][name] == shard.name
    _rewrite_shard(
        shard, lambda state: state.update({name: torch.zeros(3, 5, dtype=torch.bfloat16)})
    )
    return ValueError, rf"{shard.name}: {name} has shape \[3, 5\], config.json implies \[64, 32\]"


def tensor_not_in_its_shard(path):
    index, data = _index(path)
    name = next(
        k for k, v in data["weight_map"].items() if k.startswith(PREFIX) and "-00003-of-" in v
    )
    other = data["weight_map"][name].replace("-00003-of-", "-00002-of-")
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    return ValueError, rf"{other}: the index lists {name} in this file, but it is not there"


def unexpected_tensor(path):
    index, data = _index(path)
    shard = next(path.glob("*-00002-of-00003.*"))
    extra = PREFIX + "transformer.resblocks.0.ln_1_kv.weight"
    _rewrite_shard(shard, lambda state: state.update({extra: torch.ones(32, dtype=torch.bfloat16)}))
    data["weight_map"][extra] = shard.name
    index.write_text(json.dumps(data))
    return ValueError, rf"{shard.name}: unexpected tensor {extra}"


def config_of_another_size(path):
    config = json.loads((path / "config.json").read_text())
    config["visual"]["mlp_ratio"] = 4.0
    (path / "config.json").write_text(json.dumps(config))
    return ValueError, r"mlp.c_fc.weight has shape \[64, 32\], config.json implies \[128, 32\]"


BAD_INPUTS = [
    ("bin", no_config),
    ("bin", no_visual_section),
    ("bin", incomplete_visual_section),
    ("bin", no_visual_tensors),
    ("bin", only_language_model_weights),
    ("bin", missing_shard),
    ("safetensors", missing_shard),
    ("bin", damaged_shard),
    ("safetensors", damaged_shard),
    ("bin", wrong_shape),
    ("safetensors", wrong_shape),
    ("safetensors", tensor_not_in_its_shard),
    ("bin", tensor_not_in_its_shard),
    ("bin", unexpected_tensor),
    ("safetensors", config_of_another_size),
]


@pytest.mark.parametrize(
    ("fmt", "damage"), BAD_INPUTS, ids=[f"{fmt}-{damage.__name__}" for fmt, damage in BAD_INPUTS]
)
def test_bad_checkpoints_name_the_file_and_the_tensor(release_dirs, tmp_path, fmt, damage):
    path = shutil.copytree(release_dirs[fmt], tmp_path / fmt)
    error, message = damage(path)
    with pytest.raises(error, match=message):
        load(path)
    with pytest.raises(error, match=message):  # the extractor reads through the same checks
        extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def test_extracted_tower_loads_like_the_checkpoint(release_dirs, tmp_path, capsys):
    source, out = release_dirs["bin"], tmp_path / "towers" / "qwen-vl-visual"
    assert qwen_vl_main(["extract", str(source), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["tower"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["qwen-vl-visual"]  # no staging left
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert len(names) == 42 and all(n.startswith(PREFIX) for n in names)
        assert {handle.get_tensor(n).dtype for n in names} == {torch.bfloat16}  # as stored
    config = json.loads((out / "config.json").read_text())
    assert config["visual"]["n_queries"] == 4 and config["model_type"] == "qwen_vl_visual"
    full, extracted = load(source), load(out)
    pixels = pixels_for(full)
    assert torch.equal(extracted(pixels), full(pixels))

    assert qwen_vl_main(["extract", str(source), str(out)]) == 2  # not empty: refused
    assert "pass --overwrite" in capsys.readouterr().err
    assert qwen_vl_main(["extract", str(release_dirs["safetensors"]), str(out), "--overwrite"]) == 0
    assert torch.equal(load(out)(pixels), load(release_dirs["safetensors"])(pixels))


# ---------------------------------------------------------------------------------------------
# A whole run: feature cache (CLI), training with the demo's tiny LLM, merge, test.py.
# ---------------------------------------------------------------------------------------------


def run_flags(tiny_qwen_dir, tower_dir, shapes_dir, out, **extra) -> list[str]:
    settings = {
        "vision_library": "qwen_vl", "vision_feature_layer": -1, "image_aspect_ratio": "resize",
        "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 2e-2,
        "feature_proj_lr": 2e-2, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 4, "seed": 5, **extra,
    }  # fmt: skip
    data = shapes_dir / "train.json"
    return train_flags(tiny_qwen_dir, tower_dir, data, shapes_dir, out, **settings)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_trains_from_live_and_cached_features_merges_and_answers(
    release_dirs, tiny_qwen_dir, shapes_dir, tmp_path, monkeypatch
):
    import train
    from dataprocess.__main__ import main as dataprocess_main
    from runtime.merge import merge_checkpoint
    from visual import VisionTower

    tower_dir = release_dirs["bin"]
    live = train.main(
        run_flags(tiny_qwen_dir, tower_dir, shapes_dir, tmp_path / "live", max_steps=6)
    )
    live_losses = losses(live)
    assert len(live_losses) == 6 and live_losses[-1] < live_losses[0] - 0.4, live_losses
    names = {n for n, p in live.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("projector.") or "lora_" in n for n in names)

    cache = tmp_path / "features"
    argv = ["features", "--data", str(shapes_dir / "train.json"), "--image_folder", str(shapes_dir)]
    argv += ["--vision_model", str(tower_dir), "--vision_library", "qwen_vl"]
    argv += ["--vision_feature_layer", "-1", "--image_aspect_ratio", "resize"]
    argv += ["--dtype", "float32", "--workers", "0", "--out", str(cache)]
    assert dataprocess_main(argv) == 0
    assert json.loads((cache / "index.json").read_text())["settings"]["library"] == "qwen_vl"

    def no_tower(self, pixel_values):
        raise AssertionError("the vision tower ran in a run from the feature cache")

    with monkeypatch.context() as patch:
        patch.setattr(VisionTower, "forward", no_tower)
        flags = run_flags(tiny_qwen_dir, tower_dir, shapes_dir, tmp_path / "cached", max_steps=6)
        cached = train.main([*flags, "--feature_cache", str(cache)])
    # The same batches and schedule: the cached features are the tower's (fp32 storage).
    assert losses(cached) == pytest.approx(live_losses, abs=1e-4)

    merged = merge_checkpoint(tmp_path / "live", tmp_path / "merged", dtype="float32")
    spec = importlib.util.spec_from_file_location("prompt_test", REPO / "test.py")
    prompt_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prompt_test)
    report = prompt_test.main(
        ["--model_weights", str(merged), "--data_path", str(shapes_dir / "test.json"),
         "--image_folder", str(shapes_dir), "--max_new_tokens", "2", "--dtype", "float32"]
    )  # fmt: skip
    assert report["num_records"] == 8


def test_an_unreachable_hub_id_is_named():
    with pytest.raises(FileNotFoundError, match="not a local directory, and not a hub repo"):
        load("no-such-org/Qwen-VL-Chat-nowhere")


def test_the_zero_qwen_vl_recipes_chain():
    from runtime.config import load_config

    stages = [
        load_config(REPO / "configs" / f"qwen_vl_visual_qwen2_0.5b_stage{n}.yaml")
        for n in (1, 2, 3)
    ]
    for stage in stages:
        assert stage.vision.vision_library == "qwen_vl"
        assert (stage.vision.vision_feature_layer, stage.vision.image_aspect_ratio) == (
            -1,
            "resize",
        )
        assert stage.vision == stages[0].vision  # the projector was aligned to this output
        assert stage.language_model.image_token == "<|image_pad|>"
    assert stages[0].lora.train_mode == "projector" and stages[0].training.feature_proj_lr == 1e-3
    for stage in stages[1:]:
        assert stage.lora.train_mode == "projector+lora"
        assert stage.training.learning_rate == stage.training.feature_proj_lr == 2e-5
        assert "c_attn" not in stage.lora.target_modules  # Qwen2 names them q_proj, ...
    assert stages[1].projector.projector_path == stages[0].training.output_dir
    merged = stages[1].training.output_dir + "-merged"
    assert stages[2].projector.projector_path == merged
    assert stages[2].language_model.language_model == merged + "/language_model"


def test_a_shard_in_the_pre_zip_format_is_read_whole(release_dirs, tmp_path):
    path = shutil.copytree(release_dirs["bin"], tmp_path / "bin")
    shard = next(path.glob("*-00002-of-00003.bin"))
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    pixels = pixels_for(load(path))
    assert torch.equal(load(path)(pixels), load(release_dirs["bin"])(pixels))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_hub_id_fetches_only_the_visual_shards(release_dirs, monkeypatch, fmt):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def download(repo_id, filename, **options):
        asked.append(filename)
        file = release_dirs[fmt] / filename
        if not file.is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    tower = load("Qwen/Qwen-VL-Chat")
    stem = "pytorch_model" if fmt == "bin" else "model"
    index = [f"{stem}.{fmt}.index.json"]
    if fmt == "bin":
        index.insert(0, "model.safetensors.index.json")  # tried first, absent
    shards = [f"{stem}-0000{n}-of-00003.{fmt}" for n in (2, 3)]  # not shard 1: LM tensors only
    assert asked == ["config.json", *index, *shards]
    assert tower.settings["name_or_path"] == "Qwen/Qwen-VL-Chat"
