"""Native Qwen-7B (QWen v1) for transformers 5.x: module tree, forward pass, loss, generation.

Module names reproduce the released checkpoint exactly (`transformer.wte`, `transformer.h.N.*`,
`transformer.ln_f`, `lm_head`), so the official safetensors load with no renaming and the
published LoRA adapters keep their target names. Importing this module registers the classes
with `AutoModel` / `AutoModelForCausalLM` for `model_type "qwen"`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from .attention_qwen import build_attention_mask
from .configuration_qwen import QWenConfig
from .layers_qwen import QWenBlock, QWenRMSNorm
from .loss import loss_chunk_size, supervised_cross_entropy
from .pretrained_qwen import QWenPreTrainedModel
from .rope_qwen import logn_factors, ntk_alpha, ntk_alphas, rotary_cos_sin
from .splice import splice_image_features

# Attribute on the KV cache holding the NTK alpha chosen at prefill, reused by decode steps.
NTK_ALPHA_ATTR = "_qwen_ntk_alpha"


class QWenModel(QWenPreTrainedModel):
    """The decoder stack: embeddings (+ image splice), blocks, final norm."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder; `image_features` rows replace `config.image_token_id` embeddings.

        Positions are absolute cache slots (`cache_position`, or past length + arange) unless
        `position_ids` are given. `input_ids` may accompany `inputs_embeds` only to locate the
        image placeholders.
        """
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        embeds = self._embed(input_ids, inputs_embeds, image_features if prefill else None, prefill)
        hidden_states = self.drop(embeds)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(
                "QWenModel.forward: past_key_values must be a transformers Cache (e.g. "
                f"DynamicCache), got {type(past_key_values).__name__}."
            )
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        length = hidden_states.shape[1]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = self._positions(
            position_ids, cache_position, past_length, length, hidden_states.device
        )  # [P, T]
        rotary, logn = self._position_encoding(
            positions, attention_mask, past_key_values, past_length
        )
        mask = build_attention_mask(
            attention_mask, length, past_length, hidden_states.device, position_ids
        )

        all_hidden: list[torch.Tensor] = []
        for block in self.h:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states = block(
                hidden_states,
                rotary=rotary,
                attention_mask=mask,
                logn=logn,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        hidden_states = self.ln_f(hidden_states)  # [B, T, H]
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        image_features: torch.Tensor | None,
        prefill: bool,
    ) -> torch.Tensor:
        """Token embeddings `[B, T, H]` with image rows spliced at the placeholder ids.

        On the prefill step placeholders and feature rows must agree in number (none of either is
        fine); decode steps take generated tokens as text, whatever their id.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("QWenModel.forward: pass input_ids or inputs_embeds.")
            inputs_embeds = self.wte(input_ids)  # [B, T, H]
        if self.config.image_token_id is None:
            if image_features is not None:
                raise ValueError(
                    "QWenModel.forward: image_features given but config.image_token_id is None; "
                    "set it to the tokenizer's placeholder id (qwen.IMAGE_TOKEN)."
                )
            return inputs_embeds
        if not prefill or (image_features is None and input_ids is None):
            return inputs_embeds
        return splice_image_features(
            inputs_embeds, input_ids, image_features, self.config.image_token_id
        )

    def _position_encoding(
        self,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        past_length: int,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """RoPE tables (with the dynamic-NTK base) and the logn query scale (or None)."""
        length = positions.shape[1]
        alpha = self._ntk_alpha(attention_mask, past_key_values, past_length, length)  # [A]
        rotary = rotary_cos_sin(
            positions, alpha, self.config.rotary_dim, self.config.rotary_emb_base
        )  # 2 x [max(P,A), T, rd]
        extrapolating = past_length + length > self.config.seq_length
        if self.config.use_logn_attn and not self.training and extrapolating:
            return rotary, logn_factors(positions, self.config.seq_length)  # [P, T]
        return rotary, None

    @staticmethod
    def _positions(
        position_ids: torch.Tensor | None,
        cache_position: torch.Tensor | None,
        past_length: int,
        length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Rotary positions `[B|1, T]`: explicit ids, else absolute cache slots."""
        if position_ids is not None:
            return position_ids.view(-1, length)
        if cache_position is not None:
            return cache_position.view(1, length)
        return torch.arange(past_length, past_length + length, device=device).view(1, length)

    def _ntk_alpha(
        self,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        past_length: int,
        length: int,
    ) -> torch.Tensor:
        """Dynamic-NTK alpha `[1]` or `[B]`: chosen at prefill, then reused from the cache."""
        seq_length = self.config.seq_length
        if self.training or not self.config.use_dynamic_ntk:
            return torch.ones(1)
        if past_length == 0:
            total = length
            if attention_mask is not None and total > seq_length:
                alpha = ntk_alphas(attention_mask.sum(dim=-1).cpu(), seq_length)  # [B]
            else:
                alpha = torch.tensor([ntk_alpha(total, seq_length)])
            if past_key_values is not None:
                setattr(past_key_values, NTK_ALPHA_ATTR, alpha)
            return alpha
        cached = getattr(past_key_values, NTK_ALPHA_ATTR, None)
        if cached is None:
            # A cache filled elsewhere: its length is the best guess of the prefill length.
            cached = torch.tensor([ntk_alpha(past_length, seq_length)])
        return cached


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """QWen causal LM: `transformer` + an untied `lm_head`, with loss and `generate()`."""

    # The Trainer must not rescale this model's mean loss by the token count (DDP trap).
    accepts_loss_kwargs = False

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Forward pass; with `labels` returns the loss and **`logits=None`**.

        `labels [B, T]` are aligned with `input_ids` (`-100` = no loss); the model shifts them.
        To save memory, `lm_head` is applied only at the positions whose next-token label is
        supervised, `config.lm_loss_chunk_size` of them at a time (qwen/loss.py), so no
        `[B, T, V]` or `[n_supervised, V]` logits tensor exists when `labels` are given. The loss
        is the mean cross-entropy over supervised tokens (0, still attached to the graph, when
        there are none). Without labels, logits are returned for the last `logits_to_keep`
        positions (0 = all).
        """
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_features=image_features,
            use_cache=use_cache,
            cache_position=cache_position,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state  # [B, T, H]
        loss, logits = None, None
        if labels is not None:
            loss = self._supervised_loss(hidden_states, labels)
        else:
            # The kept rows are a strided view when B > 1; a linear layer on a strided input takes
            # a path ~6x slower on CPU (151,936-row lm_head, batch 8: 85 ms vs 13 ms), which made
            # the batched prefill cost more than all its decode steps. Copying 1 row each is free.
            kept = slice_logits_to_keep(hidden_states, logits_to_keep).contiguous()  # [B, k, H]
            logits = self.lm_head(kept)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def _supervised_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean shifted cross-entropy, `lm_head` only at supervised positions, in chunks."""
        chunk_size = loss_chunk_size(self.config)
        return supervised_cross_entropy(hidden_states, labels, self.lm_head, chunk_size)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """GenerationMixin's inputs, plus `image_features` on the prefill step only."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, **kwargs
        )
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if image_features is not None and prefill:
            inputs["image_features"] = image_features
        return inputs


def _register_auto_classes() -> None:
    """Map `model_type "qwen"` to these classes so Auto* never follows the remote `auto_map`."""
    for auto_class, model_class in (
        (AutoModel, QWenModel),
        (AutoModelForCausalLM, QWenLMHeadModel),
    ):
        # Already registered by an earlier import of this module: keep the first.
        with contextlib.suppress(ValueError):
            auto_class.register(QWenConfig, model_class)


_register_auto_classes()

__all__ = ["QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel"]
