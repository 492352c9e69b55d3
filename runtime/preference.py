"""Preference tuning (DPO and its IPO / RPO variants): the loss of one batch of pairs.

The policy is the VLM being trained. The reference is the same VLM as it started: its LLM with
the LoRA adapter disabled (peft's `disable_adapter()`, no second copy of the LLM) and a frozen
copy of the projector taken before training (the projector trains during DPO as in SFT, at
`--feature_proj_lr`; the copy is a few MB). So `--train_mode projector+lora` or `projector`
only: with `projector+llm` there is no adapter to disable, and no reference.

One step (`PreferenceObjective.__call__`) on a `dataset.preference.PreferenceCollator` batch:
the tower runs once on the pairs' images; both rows of a pair get the features (the projector
runs on them, as in SFT); the policy's answer log-probs come from one forward of all 2B rows
through the model (so DDP and ZeRO see a normal forward), the reference's from one more under
`no_grad`. Log-probs are summed over answer tokens only, in chunks (`qwen.loss`).

`--precompute_ref_log_probs`: the reference does not change during training, so
`precompute_reference` runs it once over every pair before training (batched, no grad, sharded
over the processes) and the dataset hands each pair its two values; a step then runs the policy
only. Kept in memory (two floats per pair) and computed again at every start, a resume included:
the reference is the starting model, so the values, and the resumed run, are the same.

Losses (with TRL's definitions, `trl.trainer.dpo_trainer.DPOTrainer._compute_loss`):
- `sigmoid` (DPO): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
- `ipo`: ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2, per-token averages.
- RPO (`--rpo_alpha a`): + a * the mean NLL of the chosen answers' tokens (TRL's "sft" term).
Rewards: beta * (pi - ref) per answer; logged as TRL names them: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TRAINING_OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    counts: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses `[B]` and the chosen and rejected rewards `[B]` (detached).

    `policy`, `reference`: summed answer log-probs `[2B]` (chosen rows, then rejected rows);
    `counts`: answer tokens per row `[2B]`.
    """
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.chunk(2)
    chosen_ratio = policy_chosen - reference_chosen  # [B]
    rejected_ratio = policy_rejected - reference_rejected  # [B]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        chosen_count, rejected_count = counts.clamp(min=1).chunk(2)
        delta = chosen_ratio / chosen_count - rejected_ratio / rejected_count
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--dpo_loss {loss_type!r}; allowed: {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class RewardMeans:
    """The logged rewards: per-pair values summed over a logging window, averaged when logged."""

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0] for name in METRICS}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, values in metrics.items():
            self.sums[name][0] += float(values.sum())
            self.sums[name][1] += values.numel()

    def pop(self) -> dict[str, float]:
        """The window's means (none before any pair), and a fresh window."""
        means = {name: total / count for name, (total, count) in self.sums.items() if count}
        self.sums = {name: [0.0, 0] for name in METRICS}
        return means


def adapter_disabled(llm: nn.Module):
    """The reference LLM: `llm` with its LoRA adapter off (a no-op for an LLM without one)."""
    disable = getattr(llm, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _text_rows(batch: dict) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


class PreferenceObjective:
    """The preference loss of a batch, with the reference's frozen projector.

    Build it before training changes any weight (the trainer does, at start): the projector is
    copied then. After an exact resume the copy is the same, since the starting projector is
    (seeded, or loaded from --init_from).
    """

    def __init__(
        self, vlm: nn.Module, *, beta: float, loss_type: str, rpo_alpha: float | None
    ) -> None:
        self.beta, self.loss_type, self.rpo_alpha = beta, loss_type, rpo_alpha
        self.reference_projector = copy.deepcopy(vlm.projector).requires_grad_(False).eval()

    def _vision_features(self, vlm: nn.Module, batch: dict) -> torch.Tensor | None:
        """The tower's output for the pairs' images, once per pair `[n_img, N, Dv]`.

        Under ZeRO-3 (`vlm.probe_tower`) the tower gathers its weights by collective calls, and
        the engine prefetches by the order it recorded: so a batch without images runs it too,
        on a blank image (zero rows kept), and every rank calls the same modules in one order.
        """
        if batch.get("vision_features") is not None:
            return batch["vision_features"]
        if batch.get("pixel_values") is not None:
            return vlm.vision(batch["pixel_values"])  # frozen, no grad
        if vlm.probe_tower:
            size = vlm.vision.image_size
            weight = next(self.reference_projector.parameters())
            blank = torch.zeros((1, 3, size, size), dtype=vlm.vision.dtype, device=weight.device)
            return vlm.vision(blank)[:0]  # [0, N, Dv]
        return None

    def _pair_images(self, vlm: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tower's features for the 2B rows (chosen rows' images, then rejected's) and their
        sizes; zero rows when the batch has no image."""
        features = self._vision_features(vlm, batch)
        sizes = batch.get("image_sizes")  # [n_img, 2] once per pair, or None
        if sizes is not None:
            sizes = torch.cat([sizes, sizes])
        if features is not None:
            return torch.cat([features, features]), sizes
        # no image in this batch: zero rows, so the reference never runs the image probe
        size = (0, vlm.vision.num_image_tokens, vlm.vision.hidden_size)
        weight = next(self.reference_projector.parameters())
        return weight.new_zeros(size), sizes

    @torch.no_grad()
    def _reference(
        self,
        model: nn.Module,
        vlm: nn.Module,
        rows: dict,
        features: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> torch.Tensor:
        """The starting model's summed answer log-probs `[2B]`: the LLM with its adapter off, the
        images projected and packed (AnyRes: `image_newline`) by the frozen projector copy. The
        tower ran already; the reference runs the LLM alone."""
        projected = vlm.project_features(features, self.reference_projector)  # [2n, N', Dl]
        image_rows = vlm.image_rows(projected, sizes, self.reference_projector)  # [rows, Dl]
        with adapter_disabled(vlm.llm):
            output = model(**rows, image_features=image_rows, answer_log_probs=True)
        return output.log_probs

    def reference_log_probs(self, model: nn.Module, vlm: nn.Module, batch: dict) -> torch.Tensor:
        """The reference's summed answer log-probs of a pair batch's rows `[2B]` (chosen rows,
        then rejected rows), without gradients: what `--precompute_ref_log_probs` caches."""
        features, sizes = self._pair_images(vlm, batch)
        return self._reference(model, vlm, _text_rows(batch), features, sizes)

    def __call__(
        self, model: nn.Module, vlm: nn.Module, batch: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-pair metrics). `model` is what the Trainer trains (maybe DDP-wrapped);
        `vlm` the VisionLanguageModel inside it. A batch that carries `reference_log_probs`
        (`[2B]`, precomputed) skips the reference forward."""
        rows = _text_rows(batch)
        features, sizes = self._pair_images(vlm, batch)
        images = {}
        if len(features) or vlm.probe_tower:
            images = {"vision_features": features, "image_sizes": sizes}
        # A policy batch without images takes the forward's image-path probe (or, with the tower
        # run above on a blank image, projects its zero rows), so under DDP / ZeRO every rank runs
        # the same modules in the same order (docs/ARCHITECTURE.md); the reference runs the LLM
        # alone (its projector is a plain copy, the tower ran above).
        policy = model(**rows, **images, answer_log_probs=True)
        reference = batch.get("reference_log_probs")
        if reference is None:
            reference = self._reference(model, vlm, rows, features, sizes)
        losses, chosen_rewards, rejected_rewards = preference_losses(
            policy.log_probs,
            reference,
            policy.counts,
            beta=self.beta,
            loss_type=self.loss_type,
        )
        loss = losses.mean()
        if self.rpo_alpha is not None:
            chosen_log_probs, _ = policy.log_probs.chunk(2)
            chosen_counts, _ = policy.counts.chunk(2)
            chosen_nll = -chosen_log_probs.sum() / chosen_counts.sum().clamp(min=1)  # per token
            loss = loss + self.rpo_alpha * chosen_nll
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        }
        return loss, metrics


@torch.no_grad()
def precompute_reference(
    objective: PreferenceObjective,
    vlm: nn.Module,
    pairs: Sequence[dict],
    collator: Callable[[list], dict],
    *,
    batch_size: int,
    device: torch.device | str,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference's summed answer log-probs of every pair, `[len(pairs), 2]` (chosen,
    rejected), fp32 on the CPU. In eval mode and without a data loader: no dropout and no random
    number drawn, so the run's random state is that of a run without the cache.

    With several processes, `shard` = (rank, world size): each computes every world-size-th pair,
    the last pair repeated so that every rank runs as many forwards, and `gather` (the ranks'
    tensors concatenated rank after rank, e.g. `accelerator.gather`) brings them together.
    """
    rank, world_size = shard
    total = len(pairs)
    per_rank = -(-total // world_size)
    indices = [min(i, total - 1) for i in range(rank, per_rank * world_size, world_size)]
    was_training = vlm.training
    vlm.eval()
    values = []
    try:
        for start in range(0, per_rank, batch_size):
            batch = collator([pairs[i] for i in indices[start : start + batch_size]])
            batch = {key: value.to(device) for key, value in batch.items()}
            log_probs = objective.reference_log_probs(vlm, vlm, batch).float()  # [2b]
            values.append(torch.stack(log_probs.chunk(2), dim=1))  # [b, 2]
    finally:
        vlm.train(was_training)
    mine = torch.cat(values)  # [per_rank, 2]
    if world_size > 1:  # rank r's j-th value is pair r + j * world_size
        mine = gather(mine).view(world_size, per_rank, 2).transpose(0, 1).reshape(-1, 2)
    return mine[:total].cpu()
