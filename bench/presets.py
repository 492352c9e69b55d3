"""Scale presets of the benchmarks: the architecture sizes a random-weight model is built at.

A preset names a QWen config (or a transformers Qwen2 config, for the `inputs_embeds` path), a
transformers vision-tower config, the LoRA targets and the batch shape; bench/models.py builds
from it. The `cpu` presets fit a 24 GiB CPU machine with the reference model beside ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bench.batches import SUPERVISED_FRACTION
from demo.tiny_models import TINY_QWEN

QWEN_1_8B = {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "kv_channels": 128,
    "intermediate_size": 11008,
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
}
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
    "hidden_act": "gelu_pytorch_tanh",
}
# Qwen2-0.5B's text model: grouped-query attention (14 heads, 2 KV heads), tied embeddings.
QWEN2_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# A native QWen of Qwen2-0.5B's width and depth (QWen has no GQA and an untied head).
QWEN_0_5B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "kv_channels": 64,
    "intermediate_size": 2 * 4864,  # the MLP uses half
}
CLIP_B16_224 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "image_size": 224,
    "hidden_act": "quick_gelu",
}
# LoRA on every linear of a block
QWEN_BLOCK_LINEARS = "c_attn|c_proj|w1|w2"
QWEN2_BLOCK_LINEARS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# demo.tiny_models.save_tiny_clip's tower
TINY_CLIP = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
    "image_size": 32,
}


@dataclass(frozen=True)
class ScalePreset:
    qwen: dict = field(default_factory=dict)  # QWenConfig overrides of the Qwen-7B defaults
    # Set: the LLM is a transformers Qwen2ForCausalLM of this config (the inputs_embeds path)
    qwen2: dict | None = None
    vision_type: str = "clip_vision_model"  # or siglip_vision_model
    vision: dict = field(default_factory=dict)
    max_length: int = 2048  # default --max_length
    batch_size: int = 8  # default --batch_size
    lora_targets: str | None = None  # default --lora_targets (None: LoraSettings' default)
    full_length: bool = False  # every sample max_length tokens, instead of the LLaVA-like mix
    supervised_fraction: float = SUPERVISED_FRACTION  # of each sample's text tokens
    cpu: bool = False  # small enough to run on a CPU with the reference beside it

    def with_layers(self, layers: int) -> ScalePreset:
        """The same preset with `layers` LLM blocks (a reduced depth for development)."""
        if self.qwen2 is not None:
            return replace(self, qwen2={**self.qwen2, "num_hidden_layers": layers})
        return replace(self, qwen={**self.qwen, "num_hidden_layers": layers})


# Real width on a CPU: 2 x 1024 tokens, 196 of them image tokens, 40% of all tokens supervised.
_REAL_WIDTH_CPU = {
    "vision": CLIP_B16_224,
    "max_length": 1024,
    "batch_size": 2,
    "full_length": True,
    "supervised_fraction": 0.5,  # of the 828 text tokens: 414 of 1024
    "cpu": True,
}
PRESETS = {
    "tiny": ScalePreset(qwen=dict(TINY_QWEN), vision=TINY_CLIP, max_length=512, cpu=True),
    "qwen7b-clip336": ScalePreset(vision=CLIP_L_336),
    "qwen7b-siglip384": ScalePreset(vision_type="siglip_vision_model", vision=SIGLIP_SO400M_384),
    "qwen1.8b-clip336": ScalePreset(qwen=QWEN_1_8B, vision=CLIP_L_336),
    "qwen0.5b-clipb16": ScalePreset(
        qwen2=QWEN2_0_5B, lora_targets=QWEN2_BLOCK_LINEARS, **_REAL_WIDTH_CPU
    ),
    "qwen0.5b-clipb16-native": ScalePreset(
        qwen=QWEN_0_5B, lora_targets=QWEN_BLOCK_LINEARS, **_REAL_WIDTH_CPU
    ),
}
