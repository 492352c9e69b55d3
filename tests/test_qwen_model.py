"""Tests of the native QWen model on tiny random configs (CPU, fp32, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qwen import QWenConfig, QWenLMHeadModel
from qwen.rope_qwen import logn_factors, ntk_alpha, ntk_alphas

IMAGE_ID = 500
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_channels=16,
    intermediate_size=256,
    image_token_id=IMAGE_ID,
)
# The released Qwen-7B config.json (spec A.1), verbatim keys.
REAL_7B_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "attn_dropout_prob": 0.0,
    "bf16": False,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "initializer_range": 0.02,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 32768,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 8192,
    "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "vocab_size": 151936,
}


def tiny_model(seed: int = 0, **overrides: object) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    return QWenLMHeadModel(QWenConfig(**{**TINY, **overrides})).eval()


def to_qwen2(model: QWenLMHeadModel, swap_w1_w2: bool = False) -> Qwen2ForCausalLM:
    """Qwen2ForCausalLM with the weights of `model` through the spec C.6 mapping."""
    cfg = model.config
    q2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size // 2,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads,
            hidden_act="silu",
            rms_norm_eps=cfg.layer_norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_emb_base},
            tie_word_embeddings=False,
            max_position_embeddings=256,
        )
    ).eval()
    src = model.state_dict()
    gate, up = ("w1", "w2") if swap_w1_w2 else ("w2", "w1")
    mapped = {
        "model.embed_tokens.weight": src["transformer.wte.weight"],
        "model.norm.weight": src["transformer.ln_f.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p, d = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(
                "qkv", src[p + f"attn.c_attn.{kind}"].chunk(3, dim=0), strict=True
            ):
                mapped[d + f"self_attn.{name}_proj.{kind}"] = part
        mapped[d + "input_layernorm.weight"] = src[p + "ln_1.weight"]
        mapped[d + "post_attention_layernorm.weight"] = src[p + "ln_2.weight"]
        mapped[d + "self_attn.o_proj.weight"] = src[p + "attn.c_proj.weight"]
        mapped[d + "mlp.gate_proj.weight"] = src[p + f"mlp.{gate}.weight"]
        mapped[d + "mlp.up_proj.weight"] = src[p + f"mlp.{up}.weight"]
        mapped[d + "mlp.down_proj.weight"] = src[p + "mlp.c_proj.weight"]
    q2.load_state_dict(mapped, strict=True)
    return q2


def max_diff_with_qwen2(model: QWenLMHeadModel, qwen2: Qwen2ForCausalLM) -> float:
    """Max |logit diff| over a 12-token prompt plus 4 cached decode steps."""
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (2, 12))
    ours, theirs = model(ids, use_cache=True), qwen2(ids, use_cache=True)
    diff = (ours.logits - theirs.logits).abs().max().item()
    past_a, past_b = ours.past_key_values, theirs.past_key_values
    step = ids[:, -1:]
    for _ in range(4):
        step = (step * 7 + 3) % 400
        ours, theirs = model(step, past_key_values=past_a), qwen2(step, past_key_values=past_b)
        diff = max(diff, (ours.logits - theirs.logits).abs().max().item())
    return diff


@torch.no_grad()
def test_logits_match_qwen2_and_swapped_mlp_does_not() -> None:
    model = tiny_model()
    assert max_diff_with_qwen2(model, to_qwen2(model)) <= 1e-4
    assert max_diff_with_qwen2(model, to_qwen2(model, swap_w1_w2=True)) > 1e-4


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward() -> None:
    model = tiny_model()
    ids = torch.randint(0, 400, (2, 9))
    out = model(ids[:, :6], use_cache=True)
    past = out.past_key_values
    for t in range(6, 9):
        step = model(ids[:, t : t + 1], past_key_values=past)
        full = model(ids[:, : t + 1], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_greedy_equals_argmax_of_full_forwards() -> None:
    model = tiny_model()
    ids = torch.randint(0, 400, (2, 5))
    generated = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    expected = ids
    for _ in range(6):
        nxt = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(generated, expected)
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True, top_k=0, top_p=0.9)
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], ids)


@torch.no_grad()
def test_generate_with_image_features_splices_on_prefill_only() -> None:
    model = tiny_model()
    ids = torch.tensor([[3, IMAGE_ID, IMAGE_ID, IMAGE_ID, 9, 10]])
    features = torch.randn(1, 3, 64)
    generated = model.generate(ids, image_features=features, max_new_tokens=4, do_sample=False)
    expected = ids
    for _ in range(4):
        logits = model(expected, image_features=features, use_cache=False).logits
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
    # The image really changes the prediction path compared with plain placeholder embeddings.
    plain = model(inputs_embeds=model.transformer.wte(ids)).logits[:, -1]  # no splice
    spliced = model(ids, image_features=features).logits[:, -1]
    assert (plain - spliced).abs().max() > 1e-3


@torch.no_grad()
def test_right_padding_matches_unpadded_singles() -> None:
    # seq_length 16 with NTK + logn on: the long sample (20 tokens) gets alpha 3 and logn, the
    # short one must keep alpha 1 (chosen per sample from its true length).
    model = tiny_model(seq_length=16, initializer_range=0.3)
    long_ids, short_ids = torch.randint(0, 400, (1, 20)), torch.randint(0, 400, (1, 7))
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, :7] = long_ids[0], short_ids[0]
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0], mask[1, :7] = 1, 1
    padded = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(padded[0], model(long_ids).logits[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(padded[1, :7], model(short_ids).logits[0], atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_left_padded_generate_matches_unpadded_singles() -> None:
    # generate() derives position_ids from the mask, so left padding does not shift positions.
    model = tiny_model(initializer_range=0.3)
    long_ids, short_ids = torch.randint(0, 400, (1, 7)), torch.randint(0, 400, (1, 4))
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0], batch[1, 3:] = long_ids[0], short_ids[0]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(batch, attention_mask=mask, **greedy)
    assert torch.equal(out[0], model.generate(long_ids, **greedy)[0])
    assert torch.equal(out[1, 3:], model.generate(short_ids, **greedy)[0])


def test_ntk_alpha_table_and_logn_factors() -> None:
    seq = 32
    lengths = [1, 16, 32, 33, 64, 65, 128, 129, 256]
    expected = [1, 1, 1, 3, 3, 7, 7, 15, 15]
    assert [ntk_alpha(n, seq) for n in lengths] == expected
    assert ntk_alphas(torch.tensor(lengths), seq).tolist() == expected
    factors = logn_factors(torch.tensor([[0, seq - 1, seq, 2 * seq - 1]]), seq)[0]
    assert factors[:2].tolist() == [1.0, 1.0]
    assert factors[2].item() == pytest.approx(math.log(seq + 1) / math.log(seq), rel=1e-6)
    assert factors[3].item() == pytest.approx(1.2, rel=1e-6)


@torch.no_grad()
def test_ntk_and_logn_change_long_prompts_only_at_inference() -> None:
    # A larger init sharpens attention, so position changes visibly move the logits.
    extended = tiny_model(seq_length=16, initializer_range=0.3)
    plain = tiny_model(
        seq_length=16, initializer_range=0.3, use_dynamic_ntk=False, use_logn_attn=False
    )
    long_ids, short_ids = torch.randint(0, 400, (1, 24)), torch.randint(0, 400, (1, 16))
    diff = (extended(long_ids).logits - plain(long_ids).logits).abs()
    assert diff[0, :16].max() > 1e-3  # NTK changes positions before seq_length too
    torch.testing.assert_close(extended(short_ids).logits, plain(short_ids).logits)
    extended.train(), plain.train()
    torch.testing.assert_close(extended(long_ids).logits, plain(long_ids).logits)


@torch.no_grad()
def test_ntk_alpha_from_prefill_is_reused_while_decoding() -> None:
    # Prefill 12 <= 16 tokens (alpha 1), then decode past seq_length: alpha must stay 1, so
    # the cached logits equal a model without NTK, not a fresh 20-token forward (alpha 3).
    ntk = tiny_model(seq_length=16, initializer_range=0.3, use_logn_attn=False)
    plain = tiny_model(
        seq_length=16, initializer_range=0.3, use_logn_attn=False, use_dynamic_ntk=False
    )
    ids = torch.randint(0, 400, (1, 20))
    past = ntk(ids[:, :12], use_cache=True).past_key_values
    for t in range(12, 20):
        step = ntk(ids[:, t : t + 1], past_key_values=past).logits[:, -1]
    torch.testing.assert_close(step, plain(ids).logits[:, -1], atol=2e-4, rtol=1e-4)
    assert (step - ntk(ids).logits[:, -1]).abs().max() > 1e-3


def test_supervised_only_loss_equals_full_logits_loss_and_grads() -> None:
    model = tiny_model()
    ids = torch.randint(0, 400, (2, 10))
    labels = ids.clone()
    labels[0, :4], labels[1, :7] = -100, -100
    loss = model(ids, labels=labels).loss
    assert model(ids, labels=labels).logits is None
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(ids).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 512).float(), labels[:, 1:].reshape(-1))
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(loss, full)
    for ours, ref in zip(grads, full_grads, strict=True):
        assert torch.allclose(ours, ref, atol=1e-6)


def test_gradient_checkpointing_gives_same_loss_and_grads() -> None:
    model = tiny_model().train()
    ids = torch.randint(0, 400, (2, 8))
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    loss_ckpt = model(ids, labels=ids).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_frozen_model_feeds_gradients_through_input_embeddings() -> None:
    model = tiny_model()
    model.requires_grad_(False)
    assert model.get_input_embeddings() is model.transformer.wte
    assert model.get_output_embeddings() is model.lm_head
    model.enable_input_require_grads()
    assert model(torch.randint(0, 400, (1, 4))).logits.requires_grad


def test_lora_regex_targets_and_merge() -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = tiny_model()
    ids = torch.randint(0, 400, (1, 8))
    base_logits = model(ids).logits.detach()
    target = r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.w1|mlp\.w2)"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))
    lora = [name for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 2 * 3
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        assert (unmerged - base_logits).abs().max() > 1e-3
        merged = peft_model.merge_and_unload()
        assert isinstance(merged, QWenLMHeadModel)
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_init_follows_spec() -> None:
    model = tiny_model(num_hidden_layers=8, hidden_size=128, kv_channels=32, intermediate_size=512)
    std = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert model.transformer.h[3].attn.c_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert model.transformer.h[0].mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)
    assert torch.all(model.transformer.ln_f.weight == 1)


# --- configuration and checkpoints laid out like the Qwen-7B release -------------------------

TINY_RELEASE_SIZES = {k: v for k, v in TINY.items() if k != "image_token_id"}


def write_release_dir(model: QWenLMHeadModel, path: Path, drop: str | None = None) -> dict:
    """Real config keys (tiny sizes) + bf16 safetensors in 2 shards + index; returns tensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**REAL_7B_CONFIG, **TINY_RELEASE_SIZES}))
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        file_name = f"model-0000{shard}-of-00002.safetensors"
        kept = {k: tensors[k] for k in part if k != drop}
        save_file(kept, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(kept, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_real_7b_config_reads_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(REAL_7B_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, QWenConfig)
    assert config.mlp_width == 11008 and config.seq_length == 8192
    assert config.max_position_embeddings == 32768 and config.image_token_id is None
    assert config.auto_map["AutoConfig"] == "configuration_qwen.QWenConfig"
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) == 7_721_324_544


def test_config_errors_name_the_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kv_channels \(16\) \* num_attention_heads \(3\)"):
        QWenConfig(**{**TINY, "num_attention_heads": 3})
    incomplete = {k: v for k, v in REAL_7B_CONFIG.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(incomplete))
    with pytest.raises(ValueError, match="missing required field.*hidden_size"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("loader", [QWenLMHeadModel, AutoModelForCausalLM])
def test_release_layout_loads_strictly_and_round_trips(tmp_path: Path, loader: type) -> None:
    tensors = write_release_dir(tiny_model(), tmp_path / "release")
    model, info = loader.from_pretrained(
        tmp_path / "release", dtype=torch.float32, output_loading_info=True
    )
    assert type(model) is QWenLMHeadModel
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, value in state.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, tensors[name].float()), name

    model.save_pretrained(tmp_path / "saved")
    saved = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        saved.update(load_file(str(file)))
    assert set(saved) == set(tensors)
    reloaded = QWenLMHeadModel.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_bf16_dtype_and_bin_checkpoint(tmp_path: Path) -> None:
    tensors = write_release_dir(tiny_model(), tmp_path / "release")
    bf16 = QWenLMHeadModel.from_pretrained(tmp_path / "release", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "release" / "config.json").read_text())
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    model, info = QWenLMHeadModel.from_pretrained(
        bin_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(
        model.transformer.h[1].mlp.w2.weight, tensors["transformer.h.1.mlp.w2.weight"].float()
    )


def test_missing_tensor_is_an_error_naming_it(tmp_path: Path) -> None:
    write_release_dir(tiny_model(), tmp_path, drop="transformer.h.1.mlp.w2.weight")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.w2\.weight"):
        QWenLMHeadModel.from_pretrained(tmp_path, dtype=torch.float32)
