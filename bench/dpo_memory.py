"""Peak memory of one DPO step as the answers grow: flat with the chunked log-probs.

python -m bench.dpo_memory [--answers 256,1024,4096 --variants chunked,full --steps 2]

One cell = one pair (a 24-token prompt with one image, chosen and rejected answers of `L` tokens
each) through `runtime.preference.PreferenceObjective` - tower once, policy forward with LoRA,
reference forward under no_grad with the adapter disabled - then backward, on the tiny QWen with
Qwen's real 151,936-token vocabulary (demo.tiny_models.TINY_QWEN, random weights, LoRA B drawn at
random so that the policy is not the reference) and the tiny CLIP tower, in a fresh process so its peak is its own:
- `chunked`: the shipped path (`qwen.loss.sequence_log_probs`, `--lm_loss_chunk_size` rows of
  logits at a time);
- `full`: the same step with each row's log-probs taken from the LLM's own full logits
  `[2, 24 + L, V]` (what a TRL-style forward materialises), for comparison.
The transient peak above the memory held before the step is `bench.measure.TransientPeak`'s (CPU:
RSS sampled every 2 ms; CUDA: the allocator's peak). Cells estimated above `--max_gib` are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from bench.measure import TransientPeak
from demo.tiny_models import TINY_QWEN

VARIANTS = ("chunked", "full")
PROMPT = 24
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", default="256,1024,4096", help="answer lengths, tokens")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--chunk_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="steps per cell; the peak is the max")
    parser.add_argument("--max_gib", type=float, default=12.0)
    parser.add_argument("--cell", help="run one cell, 'variant:L' (internal)")
    return parser.parse_args(argv)


def tiny_vlm(chunk_size: int):
    from demo.tiny_models import save_tiny_clip
    from model.config import LoraSettings
    from model.projector import build_projector
    from model.trainable import configure_trainable
    from model.vlm import VisionLanguageModel
    from qwen import QWenConfig, QWenLMHeadModel
    from visual import load_vision_tower

    torch.manual_seed(0)
    long = {"seq_length": 8192, "max_position_embeddings": 8192, "image_token_id": 1}
    config = QWenConfig(**{**TINY_QWEN, **long})
    llm = QWenLMHeadModel(config)
    llm.config.lm_loss_chunk_size = chunk_size
    with tempfile.TemporaryDirectory() as folder:
        vision = load_vision_tower(str(save_tiny_clip(folder)))
    projector = build_projector(
        "mlp2x_gelu", vision.hidden_size, config.hidden_size, vision.num_image_tokens
    )
    vlm = VisionLanguageModel(vision, projector, llm, image_token_id=1)
    configure_trainable(vlm, LoraSettings(lora_rank=8, lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for name, param in vlm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return vlm.train()


def full_logits_forward(vlm):
    """`vlm.forward` whose answer log-probs come from the LLM's full logits (the comparison)."""
    from dataset.conversation import IGNORE_INDEX
    from model.vlm import AnswerLogProbs

    plain = vlm.forward

    def forward(input_ids, attention_mask=None, labels=None, answer_log_probs=False, **images):
        if not answer_log_probs:
            return plain(input_ids, attention_mask, labels=labels, **images)
        features = images.get("image_features")
        if features is None:
            features = vlm.project_features(images["vision_features"])
        inputs = vlm._spliced_inputs(input_ids, features)
        logits = vlm.llm(**inputs, attention_mask=attention_mask, use_cache=False).logits
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[:, :-1].float(), -1)  # [2, T-1, V]
        picked = log_probs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return AnswerLogProbs(log_probs=(picked * keep).sum(1), counts=keep.sum(1))

    return forward


def run_cell(args: argparse.Namespace) -> dict:
    from dataset.preference import PreferenceCollator
    from runtime.preference import PreferenceObjective

    variant, answer = args.cell.split(":")
    answer = int(answer)
    vlm = tiny_vlm(args.chunk_size)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 1000, (PROMPT,), generator=generator)
    prompt[2 : 2 + vlm.num_image_tokens] = 1
    pair = {
        "prompt_ids": prompt,
        "chosen_ids": torch.randint(10, 150000, (answer,), generator=generator),
        "rejected_ids": torch.randint(10, 150000, (answer,), generator=generator),
        "pixel_values": torch.rand(1, 3, 32, 32, generator=generator),
    }
    batch = PreferenceCollator(pad_token_id=0)([pair])
    objective = PreferenceObjective(vlm, beta=0.1, loss_type="sigmoid", rpo_alpha=None)
    model = vlm
    if variant == "full":
        model = torch.nn.Module()
        model.forward = full_logits_forward(vlm)
    device = torch.device("cpu")
    peaks, loss = [], None
    for _ in range(args.steps):
        vlm.zero_grad(set_to_none=True)
        with TransientPeak(device) as peak:
            loss, _ = objective(model, vlm, batch)
            loss.backward()
        peaks.append(peak.peak_bytes)
    return {"variant": variant, "answer": answer, "peak_gib": max(peaks) / GIB, "loss": loss.item()}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return []
    results = []
    for answer in (int(x) for x in args.answers.split(",")):
        for variant in args.variants.split(","):
            rows = 2 * (PROMPT + answer) if variant == "full" else args.chunk_size
            estimate = 3 * rows * TINY_QWEN["vocab_size"] * 4 / GIB
            if estimate > args.max_gib:
                results.append(
                    {"variant": variant, "answer": answer, "skipped": f"~{estimate:.0f} GiB"}
                )
                continue
            passed = [
                f"--chunk_size={args.chunk_size}",
                f"--steps={args.steps}",
                "--cell",
                f"{variant}:{answer}",
            ]
            command = [sys.executable, "-m", "bench.dpo_memory", *passed]
            output = subprocess.run(command, check=True, capture_output=True, text=True)
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"one DPO step (1 pair, prompt {PROMPT} tokens + 1 image), vocabulary "
          f"{TINY_QWEN['vocab_size']:,}, chunk {args.chunk_size}, CPU transient peak")  # fmt: skip
    print("| answer tokens | log-probs | peak (GiB) | loss |")
    print("|---:|---|---:|---:|")
    for row in results:
        if "skipped" in row:
            print(f"| {row['answer']} | {row['variant']} | skipped ({row['skipped']}) | |")
        else:
            print(
                f"| {row['answer']} | {row['variant']} | {row['peak_gib']:.2f} | {row['loss']:.4f} |"
            )
    return results


if __name__ == "__main__":
    main()
