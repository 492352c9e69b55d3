"""peft's LoRA linear, fused: one-byte dropout masks, the scaling at rank r, the update accumulated
into the base output (model/lora_linear.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from model.config import LoraSettings
from model.lora_linear import (
    BoolMaskDropout,
    FusedLoraLinear,
    fused_lora_config,
    use_bool_mask_dropout,
)
from model.trainable import configure_trainable
from qwen.configuration_qwen import QWenConfig
from qwen.modeling_qwen import QWenLMHeadModel

SMALL = QWenConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_channels=8,
    intermediate_size=128,
    vocab_size=300,
)
TARGETS = ["c_attn", "c_proj", "w1", "w2"]  # 5 linears a block: c_proj is in attn and mlp


def test_the_mask_keeps_with_probability_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 1.0  # no zeros of its own
    dropout = BoolMaskDropout(0.3)
    y = dropout(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01  # 200,000 draws: 5 sigma is 0.005
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.7)
    assert y.dtype == x.dtype
    assert torch.equal(dropout.eval()(x), x)


def test_the_gradient_passes_the_kept_elements_only():
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    y = BoolMaskDropout(0.5)(x)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad, kept.float() * 2.0)


def test_off_the_cpu_the_mask_is_torch_s_dropout(monkeypatch):
    """No boolean bernoulli_ off the CPU: torch's dropout, and peft's forward around it."""
    calls = []
    dropout = torch.nn.functional.dropout
    monkeypatch.setattr(
        torch.nn.functional, "dropout", lambda *a, **k: calls.append(a) or dropout(*a, **k)
    )
    x = torch.empty(4, SMALL.hidden_size, device="meta")
    assert BoolMaskDropout(0.3)(x).shape == x.shape
    assert len(calls) == 1
    layer = lora_model(False, 0.3, fused=True, bool_mask=True).base_model.model.transformer.h[0]
    assert layer.mlp.w1._plain_adapter(torch.randn(3, SMALL.hidden_size)) == "default"
    assert layer.mlp.w1._plain_adapter(x) is None


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_p_outside_the_open_interval_is_refused(p):
    with pytest.raises(ValueError, match="p must be in"):
        BoolMaskDropout(p)


def lora_model(
    checkpointing: bool, dropout: float = 0.3, fused: bool = False, bool_mask: bool = False
) -> nn.Module:
    torch.manual_seed(0)
    model = QWenLMHeadModel(SMALL)
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    model = get_peft_model(model, fused_lora_config(lora) if fused else lora)
    if bool_mask:
        use_bool_mask_dropout(model)
    for name, param in model.named_parameters():  # B starts at zero; give it weight to test
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    model.train()
    return model


IDS = torch.arange(24).reshape(2, 12) % SMALL.vocab_size


def step(model: nn.Module) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Gradients of one step on a fixed input, and how often each RNG operator ran."""
    torch.manual_seed(1)
    with torch.profiler.profile() as profile:
        model(input_ids=IDS, labels=IDS).loss.backward()
    counts = {e.key: e.count for e in profile.key_averages() if "bernoulli" in e.key}
    return [p.grad for p in model.parameters() if p.requires_grad], counts


def test_checkpointing_draws_the_same_masks_again():
    plain = lora_model(False)
    assert use_bool_mask_dropout(plain) == 10  # 2 blocks x 5 adapted linears
    recomputed = lora_model(True, bool_mask=True)
    plain_grads, plain_draws = step(plain)
    recomputed_grads, recomputed_draws = step(recomputed)
    assert plain_draws == {"aten::bernoulli_": 10}
    assert recomputed_draws == {"aten::bernoulli_": 20}  # the recompute draws each mask again
    # From the RNG state checkpointing restored: the same masks, so the same gradients
    for a, b in zip(plain_grads, recomputed_grads, strict=True):
        torch.testing.assert_close(b, a)


def test_without_dropout_there_is_no_mask():
    model = lora_model(True, dropout=0.0)
    assert use_bool_mask_dropout(model) == 0
    assert all(
        isinstance(d, nn.Identity)
        for m in model.modules()
        if hasattr(m, "lora_dropout")
        for d in m.lora_dropout.values()
    )


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_forward_computes_peft_s_loss_and_gradients(dropout):
    """peft's forward and the fused one on the same weights and the same masks (same seed)."""
    reference = lora_model(False, dropout, bool_mask=True)
    fused = lora_model(False, dropout, fused=True, bool_mask=True)
    assert sum(isinstance(m, FusedLoraLinear) for m in fused.modules()) == 10
    assert not any(isinstance(m, FusedLoraLinear) for m in reference.modules())
    torch.manual_seed(1)
    expected = reference(input_ids=IDS, labels=IDS).loss
    torch.manual_seed(1)
    got = fused(input_ids=IDS, labels=IDS).loss
    torch.testing.assert_close(got, expected)
    expected.backward()
    got.backward()
    for a, b in zip(reference.parameters(), fused.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_what_the_fused_forward_does_not_cover_takes_peft_s_forward():
    """Disabled and merged adapters, other dtypes: peft's own forward, the same outputs."""
    reference = lora_model(False, 0.0).eval()
    fused = lora_model(False, 0.0, fused=True).eval()
    layer = fused.base_model.model.transformer.h[0].mlp.w1
    x = torch.randn(3, SMALL.hidden_size)
    assert layer._plain_adapter(x) == "default"
    assert layer._plain_adapter(x.double()) is None  # peft casts; the fused forward does not
    with torch.no_grad():
        torch.testing.assert_close(fused(IDS).logits, reference(IDS).logits)
        with fused.disable_adapter(), reference.disable_adapter():
            assert layer._plain_adapter(x) is None
            torch.testing.assert_close(fused(IDS).logits, reference(IDS).logits)
        fused.merge_adapter()
        reference.merge_adapter()
        assert layer._plain_adapter(x) is None
        torch.testing.assert_close(fused(IDS).logits, reference(IDS).logits)


def test_under_autocast_the_fused_layer_takes_peft_s_forward():
    """addmm_ runs in place, which autocast does not cast: bf16 activations, fp32 LoRA B."""
    reference = lora_model(False, 0.0).eval()
    fused = lora_model(False, 0.0, fused=True).eval()
    layer = fused.base_model.model.transformer.h[0].mlp.w1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._plain_adapter(torch.randn(3, SMALL.hidden_size)) is None
        torch.testing.assert_close(fused(IDS).logits, reference(IDS).logits)


def test_configure_trainable_installs_the_fused_layers_and_bool_masks(tiny_qwen_dir, tiny_clip_dir):
    from model.builder import build_vlm
    from model.config import LanguageModelConfig, ProjectorConfig, VisionConfig

    def dropouts(dropout: float, checkpointing: bool) -> set[type]:
        """The LLM's LoRA dropout classes, after checking its LoRA layers are the fused ones."""
        vlm, _ = build_vlm(
            LanguageModelConfig(language_model=str(tiny_qwen_dir), dtype="float32"),
            VisionConfig(vision_model=str(tiny_clip_dir)),
            ProjectorConfig(),
        )
        settings = LoraSettings(lora_rank=4, lora_dropout=dropout)
        configure_trainable(vlm, settings, gradient_checkpointing=checkpointing)
        layers = [
            m for m in vlm.llm.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")
        ]
        assert layers and all(type(m) is FusedLoraLinear for m in layers)
        return {
            type(d)
            for m in vlm.llm.modules()
            if hasattr(m, "lora_dropout")
            for d in m.lora_dropout.values()
        }

    assert dropouts(0.05, checkpointing=True) == {BoolMaskDropout}
    assert dropouts(0.05, checkpointing=False) == {BoolMaskDropout}
    assert dropouts(0.0, checkpointing=True) == {nn.Identity}
