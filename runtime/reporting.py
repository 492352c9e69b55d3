"""What a training run reports beyond the Trainer's own logs: token throughput and a loss plot."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Tokens per second and the share of time spent waiting for data, between two log lines.

    The Trainer counts non-padding tokens itself (`include_num_input_tokens_seen="non_padding"`
    sums `attention_mask` and gathers across ranks); this turns that count into a rate.
    `VLMTrainer` adds the time it blocks on the data loader (`add_data_wait`). `VLMTrainer.log`
    asks for the figures, because a callback's `on_log` runs after the log line was already
    stored in `trainer_state.json`.
    """

    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None
        self._data_wait = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)
        self._data_wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self._data_wait += seconds

    def measure(self, tokens_seen: int) -> dict[str, float]:
        """`tokens_per_second` and `data_wait_fraction` since the previous call (or the start)."""
        if self._mark is None:
            return {}
        now = time.perf_counter()
        then, tokens_then = self._mark
        elapsed = max(now - then, 1e-9)
        figures = {
            "tokens_per_second": round((tokens_seen - tokens_then) / elapsed, 1),
            "data_wait_fraction": round(min(self._data_wait / elapsed, 1.0), 4),
        }
        self._mark, self._data_wait = (now, tokens_seen), 0.0
        return figures


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
