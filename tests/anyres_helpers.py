"""Builders shared by the AnyRes tests: towers of a given geometry (random, tiny width, built in
milliseconds through the real `HFVisionTower`), and transformers' LLaVA-NeXT processor for the same
geometry, built offline from parameters."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from visual.hf_tower import HFVisionTower, default_preprocessor

IMAGE_TOKEN = "<image>"
# (family, image size, patch size): the demo's tiny geometry and the real CLIP-L/336 and SigLIP/384
GEOMETRIES = [("clip", 32, 8), ("siglip", 32, 8), ("clip", 336, 14), ("siglip", 384, 14)]


def hf_tower(family: str, image_size: int, patch_size: int, hidden_size: int = 8, seed: int = 0):
    """A random CLIP or SigLIP vision tower of the given geometry (feature layer -2)."""
    import torch

    dims = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**dims))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**dims))
    return HFVisionTower(model.eval(), default_preprocessor(model.config, "resize"))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny fast tokenizer with `<image>` and ChatML's markers as special tokens."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.add_tokens([IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"], special_tokens=True)
    return fast


def image_processor_kwargs(tower, pinpoints) -> dict:
    """LLaVA-NeXT image processor settings equal to the tower's preprocessing."""
    pre = tower.preprocessor
    size = tower.image_size
    kwargs = dict(
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        resample=pre.resample,
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    if pre.shortest_edge is not None:  # CLIP: shortest edge + center crop
        return {
            **kwargs,
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
        }
    # SigLIP: a plain resize; crop_size is still what LLaVA-NeXT cuts tiles of
    return {
        **kwargs,
        "size": {"height": size, "width": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": False,
    }


def reference_image_processor(tower, pinpoints, backend: str = "pil"):
    cls = LlavaNextImageProcessorPil if backend == "pil" else LlavaNextImageProcessor
    return cls(**image_processor_kwargs(tower, pinpoints))


def reference_processor(tower, pinpoints) -> LlavaNextProcessor:
    """transformers' `LlavaNextProcessor` for the tower: CLIP's class token counted then dropped
    ("default"), SigLIP's none ("full")."""
    clip = tower.drop_class_token
    return LlavaNextProcessor(
        image_processor=reference_image_processor(tower, pinpoints),
        tokenizer=word_tokenizer(),
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy="default" if clip else "full",
        num_additional_image_tokens=1 if clip else 0,
    )
