"""Time and memory of one training step (forward + backward + AdamW step), on CUDA or CPU.

Both implementations live in one process, so a process-wide peak would mix them. What is
measured instead is each step's *transient* peak above the memory held just before it (after
`zero_grad`): activations, gradients, logits, temporaries. Adding the implementation's own
resident bytes (parameters, buffers, optimizer state) estimates its peak if it ran alone.
- CUDA: exact, from the caching allocator (`max_memory_allocated` after a reset).
- CPU: the process's resident set size sampled every 2 ms from /proc/self/statm by a
  background thread; an approximation (short spikes between samples are missed, and the
  allocator may keep freed memory), but large tensors come and go from the OS with each step.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SAMPLE_SECONDS = 0.002

# What the reported peak memory is, by device type.
MEMORY_NOTE = {
    "cuda": "peak = resident (params, buffers, optimizer state) + the step's transient peak "
    "(torch.cuda.max_memory_allocated above the memory allocated before the step)",
    "cpu": "peak = resident (params, buffers, optimizer state) + the step's transient peak "
    "(process RSS sampled every 2 ms above the RSS before the step; approximate)",
}


def rss_bytes() -> int:
    """Resident set size of this process (Linux), 0 where /proc is unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


class TransientPeak:
    """Context manager: `peak_bytes` = the peak above the memory in use on entry."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_bytes = 0
        self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TransientPeak:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes() - self._base)
            time.sleep(_SAMPLE_SECONDS)

    def __exit__(self, *exc_info: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes() - self._base)


@dataclass
class StepResult:
    seconds: float
    loss: float
    transient_peak_bytes: int


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    autocast_dtype: torch.dtype | None,
) -> StepResult:
    """One timed step. `autocast_dtype` (bf16 on a GPU) runs the forward as the HF Trainer's
    `bf16=True` does; None runs it in the weights' own dtype."""
    device = batch["input_ids"].device
    optimizer.zero_grad(set_to_none=True)
    with TransientPeak(device) as memory:
        start = time.perf_counter()
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        value = float(loss.detach())  # waits for the device
        seconds = time.perf_counter() - start
    return StepResult(seconds, value, memory.peak_bytes)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, fused=fused or None)


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, buffers and optimizer state held between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed_backward_steps(compute_loss, steps: int, device: torch.device, before_step=None):
    """`steps` forward + backward passes of `compute_loss()` (which returns the loss tensor).

    Returns (seconds per step, loss values, peak bytes): the CUDA allocator's peak since the
    first step, or this process's peak RSS on CPU (so run one measured thing per process).
    `before_step` (e.g. clearing gradients) runs before each step, outside the timing.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        if before_step is not None:
            before_step()
        start = time.perf_counter()
        loss = compute_loss()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return times, losses, peak
