"""What a training run reports beyond the Trainer's own logs: token throughput and a loss plot."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Tokens per second between two logging steps, over all processes.

    The Trainer counts non-padding tokens itself (`include_num_input_tokens_seen="non_padding"`
    sums `attention_mask` and gathers across ranks); this turns that count into a rate.
    `VLMTrainer.log` asks for it, because a callback's `on_log` runs after the log line was
    already stored in `trainer_state.json`.
    """

    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def tokens_per_second(self, tokens_seen: int) -> float | None:
        if self._mark is None:
            return None
        now = time.perf_counter()
        then, tokens_then = self._mark
        self._mark = (now, tokens_seen)
        return (tokens_seen - tokens_then) / max(now - then, 1e-9)


def plot_loss_curve(log_history: list[dict], path: str | Path) -> Path | None:
    """Writes train (and eval) loss against step as a PNG; None when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evaluation:
        return None
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for points, label in ((train, "train"), (evaluation, "eval")):
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, marker="." if len(points) < 50 else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
