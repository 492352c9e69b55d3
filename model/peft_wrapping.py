"""Two known warnings silenced where peft wraps an LLM (training's LoRA, loading an adapter,
QLoRA's preparation).

peft reads `is_gradient_checkpointing` and calls `gradient_checkpointing_enable`, which
transformers 5 deprecated with FutureWarnings that every training run and every load of a LoRA
checkpoint printed. Only those warnings are ignored, only inside the wrapping call.
"""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_peft_wrapping():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        warnings.filterwarnings(
            "ignore",
            message="`gradient_checkpointing_enable` is deprecated",
            category=FutureWarning,
        )
        yield
