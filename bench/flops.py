"""Model FLOPs of one training step, counted explicitly, for model FLOPs utilisation (MFU).

Useful work only, as a matmul count (2 FLOPs per multiply-add); norms, softmax, activations and
the optimizer are left out (each is well under 1% at real sizes):
- vision tower, frozen, forward only: the blocks up to the feature layer (a block after it, and
  SigLIP's pooling head, do nothing for the VLM): 2 x params x S tokens + attention 4 x L x S^2 x D
  per image (S = N patches, + 1 class token for CLIP; bidirectional, so the full square);
- projector, trained: forward + backward with weight gradients, 6 x params x image tokens;
- LLM with a frozen base: forward 2 x P x T (P = non-embedding parameters), backward 2 x P x T
  for the activation gradients only (frozen weights get no weight gradient); attention
  4 x L x T^2 x H forward per sequence of T real tokens, counting the causal half by default
  (2 x L x T^2 x H), and twice that backward (dQ, dK, dV and dP are four matmuls, no weights);
- LoRA adapters, trained: 6 x r x (d_in + d_out) per token per adapted linear (read from the
  wrapped model: ours adapts QWen's fused c_attn, the reference its three q/k/v slices);
- LM head, frozen: 4 x H x V per supervised token (forward and input gradient). Logits at
  unsupervised positions, which transformers' LLaVA computes over the full vocabulary, are not
  credited: they are wasted work.
Recomputation under gradient checkpointing is not credited either (these are model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class VisionDims:
    hidden_size: int
    intermediate_size: int
    layers_used: int  # blocks up to and including the feature layer
    patch_size: int
    image_tokens: int  # N, patch tokens handed to the projector
    class_token: bool  # CLIP: one extra token inside the tower


@dataclass(frozen=True)
class LanguageDims:
    hidden_size: int
    mlp_width: int  # QWen: intermediate_size // 2
    layers: int
    vocab_size: int
    kv_size: int | None = None  # width of the K and V projections (GQA); None: hidden_size


def vision_block_params(v: VisionDims) -> int:
    """q/k/v/o (+ biases), fc1/fc2 (+ biases) and two LayerNorms of one ViT block."""
    d, i = v.hidden_size, v.intermediate_size
    return 4 * (d * d + d) + 2 * d * i + i + d + 4 * d


def vision_forward_flops(v: VisionDims, images: int) -> float:
    """Frozen tower, forward only, for `images` images."""
    seq = v.image_tokens + (1 if v.class_token else 0)
    patch_embed = 2 * (3 * v.patch_size**2 * v.hidden_size) * v.image_tokens
    blocks = 2 * vision_block_params(v) * v.layers_used * seq
    attention = 4 * v.layers_used * seq**2 * v.hidden_size
    return float(images * (patch_embed + blocks + attention))


def projector_params(vision_hidden: int, llm_hidden: int) -> int:
    return vision_hidden * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def projector_train_flops(vision_hidden: int, llm_hidden: int, image_tokens: int) -> float:
    """Forward + backward (activation and weight gradients) over all image tokens of a step."""
    return float(6 * projector_params(vision_hidden, llm_hidden) * image_tokens)


def llm_nonembedding_params(m: LanguageDims) -> int:
    """Per layer: Q/K/V (+ biases; QWen's c_attn), attention output, the gated MLP's three
    linears, two norms; plus the final norm. Qwen2 has the same layout with narrower K / V."""
    h, f = m.hidden_size, m.mlp_width
    qkv = h + 2 * (m.kv_size or h)
    per_layer = h * qkv + qkv + h * h + 3 * h * f + 2 * h
    return m.layers * per_layer + h


def llm_train_flops(
    m: LanguageDims,
    sequence_lengths: list[int],
    supervised_tokens: int,
    *,
    lora_rank: int = 0,
    lora: list[tuple[int, int]] | None = None,
    causal_half: bool = True,
) -> float:
    """Frozen-base LLM forward + backward over real tokens, LoRA included when `lora_rank` > 0;
    `lora` holds (d_in, d_out) of every adapted linear of the LLM, all layers."""
    tokens = sum(sequence_lengths)
    params = llm_nonembedding_params(m)
    linear = (2 + 2) * params * tokens  # forward + activation gradients
    attention_forward = sum(4 * m.layers * t * t * m.hidden_size for t in sequence_lengths)
    if causal_half:
        attention_forward /= 2
    attention = attention_forward * (1 + 2)  # backward: four matmuls for the forward's two
    adapters = 0
    if lora_rank and lora:
        adapters = 6 * lora_rank * sum(i + o for i, o in lora) * tokens
    head = 4 * m.hidden_size * m.vocab_size * supervised_tokens
    return float(linear + attention + adapters + head)


def step_flops(
    vision: VisionDims,
    language: LanguageDims,
    batch: dict,
    *,
    lora_rank: int,
    lora: list[tuple[int, int]] | None = None,
    causal_half: bool = True,
) -> dict[str, float]:
    """Per-component and total FLOPs of one step on `batch` (from bench.batches.batch_stats);
    `lora`: (d_in, d_out) of every adapted linear (bench.models.adapted_linears)."""
    # the tower's inputs: one image per sample, or an AnyRes image's base tile and grid tiles
    images = batch.get("tower_images", len(batch["sequence_lengths"]))
    image_tokens = images * vision.image_tokens  # the projector runs on every tile's N tokens
    parts = {
        "vision": vision_forward_flops(vision, images),
        "projector": projector_train_flops(vision.hidden_size, language.hidden_size, image_tokens),
        "llm": llm_train_flops(
            language,
            batch["sequence_lengths"],
            batch["supervised_tokens"],
            lora_rank=lora_rank,
            lora=lora,
            causal_half=causal_half,
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU, or None (then pass --peak_tflops)."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None
