"""The `inputs_embeds` loss path (model/vlm.py) cannot be silently wrong: an LLM whose own loss
the chunked `lm_head` loss does not reproduce - its logits transformed under a config name
`LOGIT_TRANSFORMS` does not know - is refused at composition, naming its class."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.builder import compose_vlm
from model.config import ProjectorConfig
from model.projector import build_projector
from model.vlm import LOGIT_TRANSFORMS, VisionLanguageModel
from visual import load_vision_tower

IMAGE_TOKEN_ID = 7


class ScaledLogitsLM(Qwen2ForCausalLM):
    """A Qwen2 that divides its final logits by `config.output_temperature`, a name no allow-list
    knows (like Gemma 2's soft-capping or Granite's `logits_scaling`, but unknown)."""

    def forward(self, *args, labels=None, **kwargs):
        output = super().forward(*args, **kwargs)
        logits = output.logits / self.config.output_temperature  # [B, T, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def tiny_llm(temperature: float | None = None) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa",
    )  # fmt: skip
    if temperature is None:
        return Qwen2ForCausalLM(config)
    assert "output_temperature" not in LOGIT_TRANSFORMS
    config.output_temperature = temperature
    return ScaledLogitsLM(config)


def vlm_of(llm, tiny_clip_dir) -> VisionLanguageModel:
    vision = load_vision_tower(str(tiny_clip_dir))
    projector = build_projector("mlp2x_gelu", vision.hidden_size, 32, vision.num_image_tokens)
    return VisionLanguageModel(vision, projector, llm, IMAGE_TOKEN_ID)


def test_a_plain_lm_head_passes(tiny_clip_dir):
    vlm_of(tiny_llm(), tiny_clip_dir).check_loss_path()
    vlm_of(tiny_llm(temperature=1.0), tiny_clip_dir).check_loss_path()  # a transform that is none


def test_an_unknown_logit_transform_is_refused_naming_the_llm_class(tiny_clip_dir):
    vlm = vlm_of(tiny_llm(temperature=0.5), tiny_clip_dir)
    with pytest.raises(ValueError, match="ScaledLogitsLM: its own loss .* differs"):
        vlm.check_loss_path()


def test_the_check_leaves_the_llm_in_its_mode(tiny_clip_dir):
    vlm = vlm_of(tiny_llm(), tiny_clip_dir).train()
    vlm.check_loss_path()
    assert vlm.llm.training


def test_composition_runs_the_check(tiny_clip_dir):
    """`compose_vlm`, the one composition step (training, checkpoint loading, benchmarks)."""
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: IMAGE_TOKEN_ID)
    vision = load_vision_tower(str(tiny_clip_dir))
    projector = ProjectorConfig("mlp2x_gelu")
    vlm = compose_vlm(tiny_llm(), tokenizer, vision, projector, image_token="<image>")
    assert vlm.image_token_id == IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match="ScaledLogitsLM"):
        compose_vlm(tiny_llm(0.5), tokenizer, vision, projector, image_token="<image>")
