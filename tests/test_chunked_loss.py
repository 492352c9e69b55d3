"""The chunked LM loss (qwen/loss.py) is the unchunked supervised-only loss: the same value and
gradients, for QWen's own path and for any other LLM's through the VLM, without keeping logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.config import LoraSettings
from model.projector import build_projector
from model.trainable import configure_trainable
from model.vlm import VisionLanguageModel
from qwen import QWenConfig, QWenLMHeadModel
from qwen.loss import (
    DEFAULT_LOSS_CHUNK_SIZE,
    IGNORE_INDEX,
    loss_chunk_size,
    supervised_cross_entropy,
)
from visual import load_vision_tower

VOCAB, HIDDEN = 1000, 32
IMAGE_TOKEN_ID = 7
LENGTHS = (40, 29)  # two samples, each: 3 text tokens, 16 image tokens, text
ANSWER = 12  # supervised tokens at the end of each sample: 24 in all, 5 chunks of 5
CHUNK = 5
LORA_TARGETS = {"qwen": "c_attn|w1|w2", "qwen2": "q_proj|k_proj|v_proj|gate_proj|up_proj"}
TOLERANCE = {"atol": 1e-5, "rtol": 0}


def reference_loss(hidden_states, labels, lm_head):
    """`QWenLMHeadModel._supervised_loss` before chunking: every supervised position at once."""
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden_states[:, :-1][keep]).float()  # [n, V]
    if logits.shape[0] == 0:
        return logits.sum() + hidden_states.sum() * 0.0
    return F.cross_entropy(logits, targets[keep])


def random_labels(batch: int, length: int, supervised_from: int, seed: int = 0) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    labels[:, :supervised_from] = IGNORE_INDEX
    return labels


def gradients(*tensors: torch.Tensor) -> list[torch.Tensor]:
    grads = [t.grad.clone() for t in tensors]
    for tensor in tensors:
        tensor.grad = None
    return grads


@pytest.mark.parametrize("chunk_size", [1, 7, 24, DEFAULT_LOSS_CHUNK_SIZE])
def test_value_and_gradients_equal_one_cross_entropy(chunk_size):
    torch.manual_seed(0)
    lm_head = nn.Linear(HIDDEN, VOCAB)  # with a bias, trainable
    hidden = torch.randn(3, 20, HIDDEN, requires_grad=True)  # [B, T, H]
    labels = random_labels(3, 20, supervised_from=9)
    labels[1, 15:] = IGNORE_INDEX  # right padding; 3 x 11 - 5 = 28 supervised tokens
    params = (hidden, lm_head.weight, lm_head.bias)
    chunked = supervised_cross_entropy(hidden, labels, lm_head, chunk_size)
    chunked.backward()
    chunked_grads = gradients(*params)
    expected = reference_loss(hidden, labels, lm_head)
    expected.backward()
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, expected, **TOLERANCE)
    for got, want in zip(chunked_grads, gradients(*params), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_gives_the_same_loss_with_two_matmuls_per_chunk(bias):
    """LoRA training's head is a frozen Linear: its input gradient is formed in the forward, so
    the FLOPs are the logits and that gradient, where the checkpointed path recomputes the logits."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias).requires_grad_(False)
    hidden = torch.randn(3, 20, HIDDEN, requires_grad=True)  # [B, T, H]
    labels = random_labels(3, 20, supervised_from=9)  # 3 x 11 = 33 supervised tokens
    with FlopCounterMode(display=False) as counter:
        chunked = supervised_cross_entropy(hidden, labels, lm_head, CHUNK)
        chunked.backward()
    assert counter.get_total_flops() == 2 * (2 * 33 * HIDDEN * VOCAB)
    chunked_grad = gradients(hidden)[0]
    expected = reference_loss(hidden, labels, lm_head)
    expected.backward()
    torch.testing.assert_close(chunked, expected, **TOLERANCE)
    torch.testing.assert_close(chunked_grad, gradients(hidden)[0], **TOLERANCE)
    lm_head.register_forward_pre_hook(lambda module, args: None)  # a hook: the module is called
    with FlopCounterMode(display=False) as counter:
        supervised_cross_entropy(hidden, labels, lm_head, CHUNK).backward()
    assert counter.get_total_flops() == 3 * (2 * 33 * HIDDEN * VOCAB)


def test_no_supervised_token_gives_an_attached_zero():
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(2, 6, HIDDEN, requires_grad=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[:, 0] = 3  # a label on the first token supervises nothing: there is no token before it
    loss = supervised_cross_entropy(hidden, labels, lm_head, CHUNK)
    assert torch.equal(loss, reference_loss(hidden, labels, lm_head))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()  # every rank's graph reaches lm_head and the hidden states
    assert torch.count_nonzero(lm_head.weight.grad) == 0 and torch.count_nonzero(hidden.grad) == 0


def test_no_logits_are_kept_for_backward():
    """What autograd stores: the unchunked loss keeps `log_softmax [n, V]`; the chunked loss keeps
    its inputs only (the checkpoint recomputes each chunk's logits in backward)."""
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(2, 30, HIDDEN, requires_grad=True)
    labels = random_labels(2, 30, supervised_from=1)  # 58 supervised tokens

    def largest_saved(loss_fn) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_fn(hidden, labels, lm_head)
        return max(sizes)

    assert largest_saved(reference_loss) >= 58 * VOCAB
    assert largest_saved(supervised_cross_entropy) <= hidden.numel()


def test_the_chunk_size_comes_from_the_llm_config():
    assert loss_chunk_size(SimpleNamespace()) == DEFAULT_LOSS_CHUNK_SIZE
    assert loss_chunk_size(SimpleNamespace(lm_loss_chunk_size=64)) == 64
    with pytest.raises(ValueError, match="--lm_loss_chunk_size must be a positive"):
        loss_chunk_size(SimpleNamespace(lm_loss_chunk_size=0))


def test_the_flag_reaches_the_llm_config(tiny_qwen_dir, tiny_clip_dir):
    import train

    flags = {"language_model": tiny_qwen_dir, "vision_model": tiny_clip_dir, "dtype": "float32"}
    argv = [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    vlm, _ = train.build_model(train.parse_args([*argv, "--lm_loss_chunk_size", "64"]))
    assert loss_chunk_size(vlm.llm.config) == 64


# --- through the models ---------------------------------------------------------------------------


def tiny_llm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "qwen":
        config = QWenConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            kv_channels=8, intermediate_size=64, seq_length=128, image_token_id=IMAGE_TOKEN_ID,
        )  # fmt: skip
        return QWenLMHeadModel(config)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def tiny_vlm(kind: str, tiny_clip_dir, lm_head_trains: bool) -> VisionLanguageModel:
    """A LoRA-wrapped tiny LLM (the `projector+lora` mode), its lm_head optionally trained in full
    (`--modules_to_save lm_head`: peft wraps it, so the loss must call it, not read its weight)."""
    llm = tiny_llm(kind)
    llm.config.lm_loss_chunk_size = CHUNK
    vision = load_vision_tower(str(tiny_clip_dir))
    projector = build_projector("mlp2x_gelu", vision.hidden_size, HIDDEN, vision.num_image_tokens)
    vlm = VisionLanguageModel(vision, projector, llm, IMAGE_TOKEN_ID)
    settings = LoraSettings(
        lora_rank=4,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS[kind],
        modules_to_save="lm_head" if lm_head_trains else None,
    )
    configure_trainable(vlm, settings)
    with torch.no_grad():  # LoRA B starts at zero, which would leave LoRA A without gradient
        for name, param in vlm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return vlm.train()


def make_batch(vlm: VisionLanguageModel, layout: str) -> dict[str, torch.Tensor]:
    """Two samples with one image each, the last ANSWER tokens supervised; right-padded rows with
    an attention mask, or one packed row with restarting positions and no mask."""
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in LENGTHS:
        ids = torch.randint(10, VOCAB, (length,), generator=generator)
        ids[3 : 3 + vlm.num_image_tokens] = IMAGE_TOKEN_ID
        labels = torch.full((length,), IGNORE_INDEX)
        labels[-ANSWER:] = ids[-ANSWER:]
        samples.append((ids, labels))
    pixel_values = torch.rand(len(LENGTHS), 3, 32, 32, generator=generator)
    if layout == "packed":
        return {
            "input_ids": torch.cat([ids for ids, _ in samples])[None],  # [1, 69]
            "labels": torch.cat([labels for _, labels in samples])[None],
            "position_ids": torch.cat([torch.arange(n) for n in LENGTHS])[None],
            "pixel_values": pixel_values,
        }
    width = max(LENGTHS)
    batch = {
        "input_ids": torch.zeros(len(LENGTHS), width, dtype=torch.long),  # [2, 40]
        "labels": torch.full((len(LENGTHS), width), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(LENGTHS), width, dtype=torch.long),
        "pixel_values": pixel_values,
    }
    for row, (ids, labels) in enumerate(samples):
        batch["input_ids"][row, : len(ids)] = ids
        batch["labels"][row, : len(ids)] = labels
        batch["attention_mask"][row, : len(ids)] = 1
    return batch


def loss_before_chunking(vlm: VisionLanguageModel, kind: str, batch: dict) -> torch.Tensor:
    """The VLM's loss as it was: QWen's unchunked supervised-only loss; any other LLM's own
    forward with labels (transformers' full logits and `ForCausalLMLoss`)."""
    inputs = vlm._llm_inputs(batch["input_ids"], batch["pixel_values"])
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if kind == "qwen2":
        return vlm.llm(**inputs, **extra, labels=batch["labels"], use_cache=False).loss
    hidden = vlm.llm.get_decoder()(**inputs, **extra, use_cache=False).last_hidden_state
    return reference_loss(hidden, batch["labels"], vlm.llm.get_output_embeddings())


def trainable_gradients(vlm: VisionLanguageModel) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}
    vlm.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("lm_head_trains", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", ["qwen", "qwen2"])
def test_vlm_loss_and_gradients_equal_the_unchunked_loss(
    kind, layout, lm_head_trains, tiny_clip_dir
):
    vlm = tiny_vlm(kind, tiny_clip_dir, lm_head_trains)
    batch = make_batch(vlm, layout)
    output = vlm(**batch)
    assert output.logits is None and output["loss"] is output.loss  # what the Trainer reads
    output.loss.backward()
    chunked = trainable_gradients(vlm)
    expected = loss_before_chunking(vlm, kind, batch)
    expected.backward()
    torch.testing.assert_close(output.loss, expected, **TOLERANCE)
    unchunked = trainable_gradients(vlm)
    assert chunked.keys() == unchunked.keys()
    assert any("lora_A" in n for n in chunked) and any("projector" in n for n in chunked)
    assert any("lm_head" in n for n in chunked) == lm_head_trains
    for name, grad in unchunked.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(chunked[name], grad, **TOLERANCE, msg=name)


@pytest.mark.parametrize("kind", ["qwen", "qwen2"])
def test_vlm_cached_features_give_the_same_loss(kind, tiny_clip_dir):
    vlm = tiny_vlm(kind, tiny_clip_dir, lm_head_trains=False)
    batch = make_batch(vlm, "packed")
    live = vlm(**batch).loss
    cached = {**batch, "pixel_values": None, "vision_features": vlm.vision(batch["pixel_values"])}
    torch.testing.assert_close(vlm(**cached).loss, live, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen", "qwen2"])
def test_vlm_without_supervised_tokens_gives_zero(kind, tiny_clip_dir):
    """0, as QWen's loss always gave (transformers' own mean over no token would be NaN), with a
    gradient, zero, for every trainable parameter, so DDP ranks agree on the graph."""
    vlm = tiny_vlm(kind, tiny_clip_dir, lm_head_trains=True)
    batch = make_batch(vlm, "padded")
    batch["labels"][:] = IGNORE_INDEX
    loss = vlm(**batch).loss
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    for name, param in vlm.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


def test_the_memory_benchmark_computes_one_loss_three_ways():
    from bench import loss_memory

    rows = [
        loss_memory.run_cell(
            loss_memory.parse_args(["--cell", f"{variant}:2x16:0.5", "--steps", "1"])
        )
        for variant in loss_memory.VARIANTS
    ]
    assert [row["supervised_tokens"] for row in rows] == [
        loss_memory.supervised_rows(2, 16, 0.5)
    ] * 3
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], abs=1e-5)
    assert rows[2]["loss"] == pytest.approx(rows[1]["loss"], abs=1e-5)
    assert loss_memory.estimated_gib("chunked", 16, 2048, 0.9, 512) < 1.0
