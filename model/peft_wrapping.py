"""One known warning silenced where peft wraps an LLM (training's LoRA, loading an adapter).

peft (0.18) reads `is_gradient_checkpointing`, which transformers 5 deprecated with a FutureWarning
that every training run and every load of a LoRA checkpoint printed. Only that warning is ignored,
only inside the wrapping call.
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
        yield
