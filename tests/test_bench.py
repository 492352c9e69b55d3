"""The training-step benchmark: a tiny run end to end, the FLOPs count, the real-size presets."""

from __future__ import annotations

import json

import pytest
import torch

from bench import profile_step, train_step
from bench.batches import IGNORE_INDEX, batch_stats, build_batch, llava_like_lengths
from bench.flops import (
    LanguageDims,
    VisionDims,
    llm_nonembedding_params,
    llm_train_flops,
    peak_tflops_for,
    step_flops,
    vision_block_params,
    vision_forward_flops,
)
from bench.models import adapted_linears, build_llm, build_ours, model_dims
from bench.presets import PRESETS
from model.config import LoraSettings
from model.trainable import configure_trainable

IMPL_FIELDS = {
    "median_step_s",
    "samples_per_s",
    "tokens_per_s",
    "padding_fraction",
    "peak_memory_gib",
    "first_loss",
    "achieved_tflops",
    "mfu",
}


@pytest.mark.slow
def test_tiny_benchmark_runs_both_implementations(tmp_path):
    out, table = tmp_path / "results.json", tmp_path / "results.md"
    flags = "--scale tiny --steps 2 --warmup 1 --batch_size 2 --max_length 96 --lora_rank 8"
    train_step.main([*flags.split(), "--out", str(out), "--markdown", str(table)])
    results = json.loads(out.read_text())
    assert set(results["impls"]) == {"ours", "reference"}
    for impl in results["impls"].values():
        assert set(impl) >= IMPL_FIELDS
        assert 0.0 <= impl["padding_fraction"] < 1.0
        assert impl["median_step_s"] > 0 and impl["achieved_tflops"] > 0
        assert 0 < impl["mfu"] < 1  # against the matmul peak measured in the run
        assert len(impl["losses"]) == 3
    assert results["first_loss_max_abs_diff"] < 1e-5
    assert results["median_step_ratio_ours_over_reference"] > 0
    assert "| ours |" in table.read_text() and "| reference |" in table.read_text()
    assert results["ratio_step_time"] == results["median_step_ratio_ours_over_reference"]
    assert results["ratio_peak_memory"] > 0 and results["mfu"] == results["impls"]["ours"]["mfu"]
    assert results["peak_gemm_flops"] == results["gemm_peaks"]["float32"]["peak_flops"]


def test_impossible_setups_are_refused():
    with pytest.raises(ValueError, match="--mode qlora needs a CUDA GPU"):
        train_step.main(["--mode", "qlora", "--device", "cpu"])
    with pytest.raises(ValueError, match="--scale qwen7b-clip336 .* meant for a GPU"):
        train_step.main(["--scale", "qwen7b-clip336", "--device", "cpu"])


@pytest.mark.slow
def test_real_width_cpu_presets_count_their_flops_from_the_model():
    """Qwen2-0.5B's sizes (GQA, tied head) and a QWen of its width; LoRA on every block linear."""
    with torch.device("meta"):
        assert build_llm(PRESETS["qwen0.5b-clipb16"]).num_parameters() == 494_032_768  # Qwen2-0.5B
    # c_proj names both the attention output and the MLP down projection in QWen
    for scale, targets in (("qwen0.5b-clipb16", 7), ("qwen0.5b-clipb16-native", 5)):
        preset = PRESETS[scale].with_layers(1)
        vlm = build_ours(preset, device="cpu", dtype=torch.float32)
        _, language = model_dims(vlm)
        embeddings = vlm.llm.get_input_embeddings().weight
        head = vlm.llm.get_output_embeddings().weight
        heads = embeddings.numel() + (0 if head is embeddings else head.numel())
        assert llm_nonembedding_params(language) == vlm.llm.num_parameters() - heads
        assert vlm.num_image_tokens == 196 and language.hidden_size == 896
        settings = LoraSettings(lora_rank=2, target_modules=preset.lora_targets)
        configure_trainable(vlm, settings)
        assert len(adapted_linears(vlm.llm)) == targets


def test_flops_match_a_hand_count():
    language = LanguageDims(hidden_size=4, mlp_width=8, layers=2, vocab_size=10)
    # per layer: c_attn 48 + bias 12, c_proj 16, w1/w2/c_proj 96, two norms 8 = 180; + ln_f 4
    assert llm_nonembedding_params(language) == 364
    full = llm_train_flops(language, [3, 5], supervised_tokens=2, causal_half=False)
    # linear (2 + 2) * 364 * 8 = 11648; attention 4*2*(9+25)*4 = 1088 forward, x3 with backward;
    # head 4 * 4 * 10 * 2 = 320
    assert full == 11648 + 3 * 1088 + 320
    # LoRA r=2 on c_attn (4 -> 12), w1 and w2 (4 -> 8): 6 * 2 * 40 per layer per token
    lora = step_flops(
        VisionDims(4, 8, 1, 2, 4, True),
        language,
        {"sequence_lengths": [3, 5], "supervised_tokens": 2},
        lora_rank=2,
        lora=[(4, 12), (4, 8), (4, 8)] * 2,  # ours: c_attn, w1, w2 in each of the two layers
    )
    assert lora["llm"] == 11648 + 3 * 544 + 6 * 2 * 40 * 2 * 8 + 320
    # vision block 4*(16+4) + 2*4*8 + 8 + 4 + 16 = 172; 5 tokens with CLS; patch embed 2*48*4
    assert vision_block_params(VisionDims(4, 8, 1, 2, 4, True)) == 172
    assert lora["vision"] == 2 * (2 * 48 * 4 + 2 * 172 * 5 + 4 * 25 * 4)
    assert lora["projector"] == 6 * (16 + 4 + 16 + 4) * 8
    assert lora["total"] == lora["vision"] + lora["projector"] + lora["llm"]
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0


def test_flops_parameter_counts_match_the_tiny_model():
    vlm = build_ours(PRESETS["tiny"], device="cpu", dtype=torch.float32)
    vision, language = model_dims(vlm)
    embeddings = vlm.llm.transformer.wte.weight.numel() + vlm.llm.lm_head.weight.numel()
    assert llm_nonembedding_params(language) == vlm.llm.num_parameters() - embeddings
    block = next(m for n, m in vlm.vision.model.named_modules() if n.endswith("layers.0"))
    assert vision_block_params(vision) == sum(p.numel() for p in block.parameters())
    assert vision.layers_used == 1  # feature layer -2 of 2 blocks
    assert vision_forward_flops(vision, 2) > 0


@pytest.mark.parametrize(
    ("scale", "llm_parameters", "image_tokens"),
    [
        ("qwen7b-clip336", 7_721_324_544, 576),
        ("qwen7b-siglip384", 7_721_324_544, 729),
        ("qwen1.8b-clip336", 1_836_828_672, 576),
    ],
)
def test_real_size_presets_build_on_meta(scale, llm_parameters, image_tokens):
    vlm = build_ours(PRESETS[scale], device="meta", dtype=torch.bfloat16)
    assert vlm.llm.num_parameters() == llm_parameters
    assert vlm.num_image_tokens == image_tokens
    assert vlm.llm.transformer.wte.weight.dtype == torch.bfloat16
    assert vlm.projector.linear_1.weight.dtype == torch.float32


def test_length_mix_and_batch_layout():
    lengths = llava_like_lengths(2000, seed=3)
    assert lengths == llava_like_lengths(2000, seed=3)
    assert min(lengths) >= 20 and max(lengths) <= 1200
    assert 0.3 < sum(n <= 80 for n in lengths) / len(lengths) < 0.5
    batch = build_batch(
        [30, 500],
        num_image_tokens=16,
        image_size=32,
        max_length=256,
        image_token_id=151646,
        generator=torch.Generator().manual_seed(0),
    )
    stats = batch_stats(batch)
    assert stats["sequence_lengths"] == [46, 256]  # 30 + 16; 500 truncated to 256
    assert stats["supervised_tokens"] == 9 + 72  # the last 30% of 30 and of 240 text tokens
    supervised = batch["labels"] != IGNORE_INDEX
    assert not (supervised & (batch["attention_mask"] == 0)).any()
    assert not (supervised & (batch["input_ids"] == 151646)).any()
    assert (batch["input_ids"] == 151646).sum() == 32
    assert 0.0 < stats["padding_fraction"] < 1.0


def mm_calls(table: str) -> int:
    row = next(line for line in table.splitlines() if line.split()[:1] == ["aten::mm"])
    return int(row.split()[-1])  # the "# of Calls" column


@pytest.mark.slow
def test_the_profile_recomputes_under_gradient_checkpointing():
    """bench.profile_step profiles the step bench.train_step times, checkpointing included."""
    flags = ["--scale", "tiny", "--lora_rank", "8", "--rows", "200"]
    plain = profile_step.main(flags)
    checkpointed = profile_step.main([*flags, "--gradient-checkpointing"])
    assert "gradient checkpointing False" in plain
    assert "gradient checkpointing True" in checkpointed
    assert mm_calls(checkpointed) > mm_calls(plain)  # the decoder's forward runs twice
