"""QWenPreTrainedModel: what every QWen model class shares (weight init, strict loading)."""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .attention_qwen import RESIDUAL_PROJECTION_ATTR
from .configuration_qwen import QWenConfig

logger = logging.getLogger(__name__)


class QWenPreTrainedModel(PreTrainedModel):
    """Shared loading / init rules: strict weight loading, the spec's init, checkpointing."""

    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Buffers of the original remote code that some old checkpoints still carry.
    _keys_to_ignore_on_load_unexpected = [
        r"attn\.masked_bias",
        r"attn\.bias$",
        r"attn\.logn_tensor",
        r"rotary_emb\.inv_freq",
    ]

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for linears and embeddings; c_proj N(0, range / sqrt(2L))."""
        super()._init_weights(module)
        # Tagged per Linear (not matched on the parent): transformers skips the init hook for
        # parameter-less container modules of non-library models.
        if getattr(module, RESIDUAL_PROJECTION_ATTR, False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, but a checkpoint missing any tensor is an error.

        transformers only warns about missing keys and fills them with random init, which for a
        frozen LLM silently produces garbage.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(str(item) for item in info.get("mismatched_keys") or [])
        if missing or mismatched:
            problems = [f"missing tensors {missing}"] if missing else []
            problems += [f"shape mismatches {mismatched}"] if mismatched else []
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(source)!r}): the checkpoint does not fit "
                f"the model: {'; '.join(problems)}."
            )
        if info.get("unexpected_keys"):
            logger.warning(
                "%s: checkpoint %s has tensors the model does not use: %s",
                cls.__name__,
                source,
                sorted(info["unexpected_keys"]),
            )
        return (model, info) if want_info else model
