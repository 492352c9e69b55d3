"""The vision-language model: a frozen vision tower, a trainable projector, and an LLM.

Composition, not inheritance: three attributes (`vision`, `projector`, `llm`) and no per-LLM
mixins. Qwen-7B (`model_type "qwen"`) splices image features inside its own `QWenModel.forward`;
any other causal LM gets the very same splice function applied to its `inputs_embeds`, and the
very same loss (qwen/loss.py) applied to its decoder's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from model.anyres import AnyResProjector
from qwen import splice_image_features
from qwen.loss import loss_chunk_size, sequence_log_probs, supervised_cross_entropy
from visual.anyres import AnyResImageProcessor
from visual.processing import FixedGridProcessor, ImageProcessor

# Config fields of LLMs whose logits are not plain `lm_head(hidden)` (Gemma 2's soft-capping,
# Cohere's and Granite's scaling): those keep their own forward and loss. An LLM that transforms
# its logits under any other name is caught at composition (`check_loss_path`), not trained wrongly.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# The probe batch of `check_loss_path`: token count, and how far the two losses may differ
# (relative; bf16 rounding stays well inside it, a logit transform does not).
PROBE_TOKENS = 8
PROBE_RTOL = 1e-2


@dataclass
class AnswerLogProbs(ModelOutput):
    """`forward(..., answer_log_probs=True)`: log pi(answer | prompt) per row, fp32 `[B]`, summed
    over the row's supervised tokens, and how many there are `[B]`."""

    log_probs: torch.Tensor | None = None
    counts: torch.Tensor | None = None


def _transforms_logits(llm: nn.Module) -> bool:
    return any(getattr(llm.config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS)


class VisionLanguageModel(nn.Module):
    """vision `[n_img, 3, H, W] -> [n_img, N, Dv]`, projector `-> [n_img, N', Dl]`, llm."""

    # The forward takes no **kwargs, so the HF Trainer never rescales the loss by the number of
    # processes (see docs/ARCHITECTURE.md); this makes it explicit as well.
    accepts_loss_kwargs = False

    def __init__(
        self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int
    ):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = int(image_token_id)
        # Run the frozen tower too on batches without images (see `_image_path_probe`)
        self.probe_tower = False

    @property
    def native_splice(self) -> bool:
        """True for Qwen-7B, whose own forward takes `image_features`."""
        return getattr(self.llm.config, "model_type", None) == "qwen"

    @property
    def num_image_tokens(self) -> int:
        """Rows per image of the fixed grid: the projector's output count (saved in the
        checkpoint config). Token counts of images are asked of `image_processor`."""
        return int(self.projector.num_output_tokens)

    @property
    def image_processor(self) -> ImageProcessor:
        """The image side of the processor seam (visual/processing.py). AnyRes: the tiling of
        the projector's geometry with the tower's preprocessing (`image_rows` packs the tiles).
        The tower's own when its count depends on the image size; otherwise a fixed grid of the
        tower's preprocessing and this model's rows per image (a resampler changes the tower's N)."""
        if isinstance(self.projector, AnyResProjector):
            return AnyResImageProcessor(self.projector.geometry, self.vision.preprocessor)
        processor = self.vision.image_processor
        if processor.fixed_num_image_tokens is None:
            return processor
        return FixedGridProcessor(self.vision.preprocessor, self.num_image_tokens)

    def image_rows(
        self,
        image_features: torch.Tensor,
        image_sizes: torch.Tensor | None,
        projector: nn.Module | None = None,
    ) -> torch.Tensor:
        """Projected features -> the flat `[total_rows, Dl]` rows the splice takes, image after
        image in batch order: image i contributes `image_processor.num_image_tokens(size_i)`
        rows. AnyRes: `image_features` are all images' tiles `[sum of 1 + tiles, N, Dl]`, packed
        by their `image_sizes` (`model.anyres.pack_images`) with the `image_newline` of
        `projector` (default `self.projector`; DPO's reference packs with its frozen copy's). The
        fixed grid's `[n_img, N', Dl]` simply flattens; `image_sizes` [n_img, 2] (None from a
        feature cache) must then name one size per image."""
        projector = self.projector if projector is None else projector
        if isinstance(projector, AnyResProjector):
            if image_sizes is None:
                raise ValueError("an AnyRes model needs image_sizes to lay out its images' tiles")
            return projector.pack(image_features, image_sizes)  # [total_rows, Dl]
        if image_sizes is not None and image_sizes.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"{image_sizes.shape[0]} image_sizes for {image_features.shape[0]} images"
            )
        return image_features.reshape(-1, image_features.shape[-1])  # [n_img * N', Dl]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision_features = self.vision(pixel_values)  # [n_img, N, Dv], no grad
        return self.project_features(vision_features)  # [n_img, N', Dl]

    def project_features(
        self, vision_features: torch.Tensor, projector: nn.Module | None = None
    ) -> torch.Tensor:
        """Tower output (live, or read from a feature cache) `[n_img, N, Dv]` -> `[n_img, N', Dl]`,
        through `self.projector` or another of its shape (DPO's frozen reference copy)."""
        projector = self.projector if projector is None else projector
        expected = (self.vision.num_image_tokens, self.vision.hidden_size)
        if vision_features.dim() != 3 or tuple(vision_features.shape[1:]) != expected:
            raise ValueError(
                f"vision_features must have shape [n_img, {expected[0]}, {expected[1]}] for this "
                f"vision tower, got {tuple(vision_features.shape)}"
            )
        weight = next(projector.parameters())
        image_features = projector(vision_features.to(weight.dtype))  # [n_img, N', Dl]
        return image_features.to(self.llm.get_input_embeddings().weight.dtype)

    def _llm_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        vision_features: torch.Tensor | None = None,
        probe: bool = False,
        image_sizes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> dict:
        given = [pixel_values is not None, vision_features is not None, image_features is not None]
        if sum(given) > 1:
            raise ValueError(
                "pass one of pixel_values, cached vision_features or projected image_features"
            )
        if image_features is not None:  # projected and packed already: the splice's rows
            if image_features.dim() != 2:
                raise ValueError(
                    "image_features must be the packed rows [total_rows, Dl] of `image_rows`, got "
                    f"shape {tuple(image_features.shape)}"
                )
        elif pixel_values is not None:
            image_features = self.image_rows(self.encode_images(pixel_values), image_sizes)
        elif vision_features is not None:
            image_features = self.image_rows(self.project_features(vision_features), image_sizes)
        elif probe:
            # A training batch without images would leave the image path out of the graph, and
            # under DDP or ZeRO the ranks would disagree on which gradients exist, which weights
            # to gather, and in which order: a hang. Instead it carries zero rows of a blank
            # image's features, spliced like real ones: the same modules run in the same order
            # forward and backward on every rank, with zero gradients and the loss unchanged.
            image_features = self._image_path_probe()[:0]  # [0, N', Dl]
            if isinstance(self.projector, AnyResProjector):  # image_newline joins the graph too
                newline = self.projector.image_newline.to(image_features.dtype)
                image_features = image_features.flatten(0, 1) + newline  # [0, Dl]
        return self._spliced_inputs(input_ids, image_features)

    def _spliced_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> dict:
        """The LLM's inputs: ids + features for Qwen-7B's own splice, else spliced embeddings."""
        if self.native_splice:
            return {"input_ids": input_ids, "image_features": image_features}
        inputs_embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, Dl]
        inputs_embeds = splice_image_features(
            inputs_embeds, input_ids, image_features, self.image_token_id
        )
        return {"inputs_embeds": inputs_embeds}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        answer_log_probs: bool = False,
    ):
        """Training / scoring forward. Packed batches (dataset/packing.py) carry `position_ids`
        that restart at every sample and no `attention_mask`; the LLM isolates samples from them.
        Batches read from a feature cache carry `vision_features` (the frozen tower's output,
        `[n_img, N, Dv]`) instead of `pixel_values`: the tower is skipped, the projector runs;
        `image_features` are the rows the splice takes already (`image_rows`' `[total_rows, Dl]`):
        tower, projector and packing are skipped. `image_sizes` `[n_img, 2]` (height, width)
        travel with the images (`image_rows`).

        With `answer_log_probs` (preference tuning) it returns `AnswerLogProbs`: each row's
        log-probability of its supervised tokens, summed, and their count, instead of the loss.
        """
        probe = self.training and labels is not None
        inputs = self._llm_inputs(
            input_ids,
            pixel_values,
            vision_features,
            probe=probe,
            image_sizes=image_sizes,
            image_features=image_features,
        )
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if answer_log_probs:
            if labels is None:
                raise ValueError("answer_log_probs needs labels: they mark the answer tokens")
            return self._answer_log_probs(inputs, attention_mask, labels)
        if labels is not None and not self.native_splice and not _transforms_logits(self.llm):
            output = self._decoder_loss(inputs, attention_mask, labels)
        else:
            output = self.llm(
                **inputs, attention_mask=attention_mask, labels=labels, use_cache=False
            )
        return output

    def _decoder_loss(
        self, inputs: dict, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> CausalLMOutputWithPast:
        """Any other LLM's loss, computed as QWen computes its own (qwen/loss.py): its decoder's
        final hidden states through its `lm_head` at supervised positions, in chunks. Its own
        forward would build `[B, T, V]` logits; `logits` stays None here, as in QWen's."""
        decoder = self.llm.get_decoder()  # a PeftModel hands this on to the wrapped LLM
        outputs = decoder(**inputs, attention_mask=attention_mask, use_cache=False)
        hidden_states = outputs.last_hidden_state  # [B, T, Dl]
        lm_head = self.llm.get_output_embeddings()
        chunk_size = loss_chunk_size(self.llm.config)
        loss = supervised_cross_entropy(hidden_states, labels, lm_head, chunk_size)
        return CausalLMOutputWithPast(loss=loss)

    def _answer_log_probs(
        self, inputs: dict, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> AnswerLogProbs:
        """The decoder path and chunked `lm_head` of the LM loss (qwen/loss.py), for every LLM,
        summed by row instead of averaged."""
        if _transforms_logits(self.llm):
            raise ValueError(
                f"{type(self.llm).__name__} transforms its logits ({', '.join(LOGIT_TRANSFORMS)}); "
                "preference tuning computes log-probs from plain lm_head logits and cannot train it"
            )
        decoder = self.llm.get_decoder()  # a PeftModel hands this on to the wrapped LLM
        outputs = decoder(**inputs, attention_mask=attention_mask, use_cache=False)
        hidden_states = outputs.last_hidden_state  # [B, T, Dl]
        lm_head = self.llm.get_output_embeddings()
        chunk_size = loss_chunk_size(self.llm.config)
        log_probs, counts = sequence_log_probs(hidden_states, labels, lm_head, chunk_size)
        return AnswerLogProbs(log_probs=log_probs, counts=counts)

    @torch.no_grad()
    def check_loss_path(self) -> None:
        """Refuses an LLM whose own loss differs from the chunked `lm_head` loss of
        `_decoder_loss` on a tiny probe batch, naming its class: its logits are transformed under
        a name `LOGIT_TRANSFORMS` does not know, and training through `_decoder_loss` would
        optimise a different loss. Called once by `model.builder.compose_vlm`."""
        if self.native_splice or _transforms_logits(self.llm):
            return  # their own forward computes the loss
        embeddings = self.llm.get_input_embeddings()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, embeddings.num_embeddings, (1, PROBE_TOKENS), generator=generator)
        ids = ids.to(embeddings.weight.device)  # [1, T]
        inputs = {"inputs_embeds": embeddings(ids)}  # [1, T, Dl]
        mask = torch.ones_like(ids)
        was_training = self.llm.training
        self.llm.eval()  # no dropout: both losses see the same network
        try:
            own = self.llm(**inputs, attention_mask=mask, labels=ids, use_cache=False).loss
            chunked = self._decoder_loss(inputs, mask, ids).loss
        finally:
            self.llm.train(was_training)
        own, chunked = float(own), float(chunked)
        if abs(own - chunked) > PROBE_RTOL * max(abs(own), 1e-6):
            raise ValueError(
                f"{type(self.llm).__name__}: its own loss ({own:.4f}) differs from the chunked "
                f"lm_head loss ({chunked:.4f}) on a probe batch, so its final logits are "
                "transformed in a way model/vlm.py does not know; add the config field that "
                "enables the transform to LOGIT_TRANSFORMS in model/vlm.py so that it keeps "
                "its own forward and loss"
            )

    def _image_path_probe(self) -> torch.Tensor:
        """The projector on blank tower output `[1, N', Dl]`; with `probe_tower` (set by the run
        layer under ZeRO-3, where the tower gathers its weights by collective calls too) tower
        and projector on a blank image."""
        weight = next(self.projector.parameters())
        if self.probe_tower:
            size = self.vision.image_size
            blank = torch.zeros((1, 3, size, size), dtype=self.vision.dtype, device=weight.device)
            return self.encode_images(blank)  # [1, 3, H, W] -> [1, N', Dl]
        shape = (1, self.vision.num_image_tokens, self.vision.hidden_size)
        blank = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # [1, N, Dv]
        return self.project_features(blank)  # [1, N', Dl]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Returns only the newly generated token ids, `[B, new]`."""
        inputs = self._llm_inputs(input_ids, pixel_values, image_sizes=image_sizes)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output = self.llm.generate(**inputs, attention_mask=attention_mask, **generate_kwargs)
        # With input_ids, generate returns prompt + new tokens; with inputs_embeds, only new ones.
        return output[:, input_ids.shape[1] :] if "input_ids" in inputs else output
