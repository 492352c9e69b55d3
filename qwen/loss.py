"""The LM loss of every LLM: shifted cross-entropy over supervised tokens, in bounded memory.

`lm_head` runs only on hidden states whose next-token label is supervised, and only on
`chunk_size` of them at a time: a chunk's fp32 logits `[C, V]` exist during its forward and again
during its backward (recomputed, not stored), so the loss holds one chunk's logits, never the
batch's. At Qwen's 151,936-token vocabulary fp32 logits cost 0.6 MB per token: 16 x 2048 mostly
supervised tokens would need 18 GB for them alone (and as much again for their gradient), a
512-token chunk needs 0.3 GB. The value and the gradients equal one `F.cross_entropy` over all
supervised logits (tests/test_chunked_loss.py); the price is a second `lm_head` matmul per chunk,
except where the head is a plain frozen `nn.Linear` (LoRA and projector training): its input
gradient, `(softmax - one_hot) @ W`, is then formed in the forward while the chunk's logits exist,
so a chunk costs two head matmuls instead of three (`_FrozenHeadCrossEntropy`).

`QWenLMHeadModel` calls it with its `lm_head`; `model/vlm.py` calls it for any other LLM with the
LLM's output embeddings, so every LLM trains on the same loss. `sequence_log_probs` sums the same
chunked per-token terms by row: the log-probability of each answer that preference tuning needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Supervised tokens per chunk: enough rows for the [C, H] x [H, V] matmul to run at full speed, few
# enough that a chunk's peak (its fp32 logits and the log-softmax beside them) is ~0.6 GB at V 151,936.
DEFAULT_LOSS_CHUNK_SIZE = 512
# The LLM config attribute that overrides the default (set from `--lm_loss_chunk_size`).
CHUNK_SIZE_ATTR = "lm_loss_chunk_size"


def loss_chunk_size(config) -> int:
    """The chunk size an LLM config asks for, or the default."""
    size = getattr(config, CHUNK_SIZE_ATTR, None)
    if size is None:
        return DEFAULT_LOSS_CHUNK_SIZE
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--{CHUNK_SIZE_ATTR} must be a positive number of tokens, got {size!r}")
    return size


def _supervised_tokens(
    hidden_states: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states [n, H], next-token targets [n], row of each [n]) of the supervised tokens."""
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the input shape "
            f"{tuple(hidden_states.shape[:2])} (labels are aligned with input_ids)."
        )
    targets = labels[:, 1:].to(hidden_states.device)  # [B, T-1]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    rows = keep.nonzero()[:, 0]  # [n]
    return hidden_states[:, :-1][keep], targets[keep], rows  # [n, H], [n], [n]


def _token_losses(
    picked: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, chunk_size: int
) -> torch.Tensor:
    """Cross-entropy of each picked token `[n]`, one chunk of logits at a time."""
    return torch.cat(
        [
            # Non-reentrant checkpoint: keeps only the chunk's inputs and reruns `_chunk_loss` (so
            # `lm_head`) in backward, which is where the chunk's logits exist a second time.
            checkpoint(_chunk_loss, lm_head, hidden, target, [], use_reentrant=False)
            for hidden, target in zip(
                picked.split(chunk_size), targets.split(chunk_size), strict=True
            )
        ]
    )


def supervised_cross_entropy(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised tokens, as an fp32 scalar.

    `hidden_states [B, T, H]` are the LLM's final hidden states; `labels [B, T]` are aligned with
    `input_ids` (`-100` = no loss) and shifted here. `lm_head` is any module `[n, H] -> [n, V]`
    (a Linear, a peft wrapper of one); it is called, never unpacked, so LoRA, `modules_to_save`
    copies and DeepSpeed's parameter hooks all apply. With no supervised token the loss is 0,
    still attached to `lm_head` and `hidden_states` so every DDP rank builds the same graph.
    """
    picked, targets, _ = _supervised_tokens(hidden_states, labels)
    if picked.shape[0] == 0:
        # A zero that still reaches every trainable parameter's graph, so DDP ranks do not wait
        # on each other forever.
        return lm_head(picked).float().sum() + hidden_states.sum() * 0.0
    if _is_plain_frozen_linear(lm_head) and picked.requires_grad:
        head = (lm_head.weight, lm_head.bias)
        chunks = zip(picked.split(chunk_size), targets.split(chunk_size), strict=True)
        total = sum(
            _FrozenHeadCrossEntropy.apply(hidden, *head, target) for hidden, target in chunks
        )
        return total / picked.shape[0]
    return _token_losses(picked, targets, lm_head, chunk_size).sum() / picked.shape[0]


def sequence_log_probs(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token log-probability over its supervised tokens, fp32 `[B]`, and
    how many tokens each row sums `[B]` (the preference losses' log pi(answer | prompt)).

    The same chunks as `supervised_cross_entropy`: memory holds one chunk's logits, whatever the
    answers' length. A row without supervised tokens sums to 0.
    """
    picked, targets, rows = _supervised_tokens(hidden_states, labels)
    batch = hidden_states.shape[0]
    counts = torch.bincount(rows, minlength=batch)  # [B]
    zero = lm_head(picked[:0]).float().sum() + hidden_states.sum() * 0.0  # keeps the graph whole
    sums = zero.expand(batch).clone()  # [B]
    if picked.shape[0]:
        sums = sums.index_add(0, rows, -_token_losses(picked, targets, lm_head, chunk_size))
    return sums, counts


def _is_plain_frozen_linear(lm_head: nn.Module) -> bool:
    """An `nn.Linear` (not a subclass or a wrapper) whose parameters take no gradient and that no
    hook watches (DeepSpeed ZeRO-3 gathers weights in hooks): calling it is `F.linear` on its
    weight, so the loss may use the weight directly."""
    return (
        type(lm_head) is nn.Linear
        and not any(p.requires_grad for p in lm_head.parameters())
        and not (lm_head._forward_pre_hooks or lm_head._forward_hooks)
    )


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of one chunk through a frozen linear head, `hidden [C, H]` in.

    Forward builds the chunk's fp32 logits once, takes the loss as `_SummedCrossEntropy` does,
    turns the logits into `softmax - one_hot` in place and multiplies by the weight: the input
    gradient `[C, H]` is all it keeps. Backward only scales it. Two head matmuls per chunk,
    against the checkpointed path's three (forward, recompute, input gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = F.linear(hidden, weight, bias).float()  # [C, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # [C, V]
        target_log_probs = log_probs.gather(1, targets[:, None]).squeeze(1)  # [C]
        del log_probs
        lse = logits.gather(1, targets[:, None]).squeeze(1) - target_log_probs  # [C]
        probs = logits.sub_(lse[:, None]).exp_()  # softmax [C, V]
        probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
        ctx.save_for_backward(probs.to(weight.dtype) @ weight)  # d loss / d hidden, [C, H]
        return -target_log_probs.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (hidden_grad,) = ctx.saved_tensors
        return hidden_grad * grad.to(hidden_grad.dtype), None, None, None


def _chunk_loss(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, cache: list
) -> torch.Tensor:
    return _TokenCrossEntropy.apply(lm_head(hidden).float(), targets, cache)  # logits [C, V]


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy `[C]` of one chunk's fp32 logits, in at most two `[C, V]` tensors.

    `F.cross_entropy` keeps its `log_softmax` `[C, V]` for backward and builds two more there;
    this keeps the logits only (the checkpoint drops them until backward recomputes them) and
    turns them into their own gradient, `softmax - one_hot` (times each token's incoming
    gradient), in place. The checkpoint runs `forward` twice; `cache` carries the first run's
    log-sum-exp and losses into the second, which then skips the softmax pass.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cache: list) -> torch.Tensor:
        if not cache:
            log_probs = torch.log_softmax(logits, dim=-1)  # [C, V], freed on return
            target_log_probs = log_probs.gather(1, targets[:, None]).squeeze(1)  # [C]
            target_logits = logits.gather(1, targets[:, None]).squeeze(1)  # [C]
            cache += [target_logits - target_log_probs, -target_log_probs]  # lse [C], losses [C]
        ctx.save_for_backward(logits, cache[0], targets)
        return cache[1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lse, targets = ctx.saved_tensors
        # In place is safe: the checkpoint recomputed these logits for this backward alone (a
        # retained graph's second backward recomputes them again).
        probs = logits.sub_(lse[:, None]).exp_()  # softmax [C, V]
        probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
        return probs.mul_(grad[:, None]), None, None
