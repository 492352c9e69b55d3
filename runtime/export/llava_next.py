"""An AnyRes model as transformers' `LlavaNextForConditionalGeneration`: config, weights, processor.

The conversion of `llava.py` (tower, projector and text model, their names; QWen -> Qwen2) plus
what LLaVA-NeXT adds: `image_grid_pinpoints`, the `image_newline` weight (the projector's
`image_newline` here, `model.image_newline` there), and a `LlavaNextProcessor` whose image
processor tiles as `visual/anyres.py` does (PIL backend, the same resampling) and expands each
placeholder to our count for the image's size. `write_llava_next` writes the directory of an
in-memory model; `python -m runtime.export` (`writer.export_checkpoint`) calls it for an anyres
checkpoint and writes LLaVA for a fixed grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from dataset.conversation import chat_stop_token_ids
from model.anyres import AnyResProjector
from model.checkpoint import readable_weights
from model.config import DTYPES
from model.vlm import VisionLanguageModel
from runtime.export.llava import (
    CLASS_TOKENS,
    PROJECTOR_PREFIX,
    SELECT_STRATEGY,
    llava_config,
    llava_state_dict,
    saved_layout,
)
from runtime.export.processor import image_processor_settings
from runtime.export.tokenizer import chat_template, export_tokenizer
from runtime.outputs import atomic_directory, check_destination

NEWLINE_KEY = "model.image_newline"


def check_anyres_convertible(vlm: VisionLanguageModel) -> None:
    """What LLaVA-NeXT cannot hold beyond LLaVA's limits (`llava.check_convertible`)."""
    if not isinstance(vlm.projector, AnyResProjector):
        raise ValueError(
            f"LLaVA-NeXT needs an anyres model (AnyResProjector), got "
            f"{type(vlm.projector).__name__}: export a fixed-grid model as LLaVA"
        )
    pre, geometry = vlm.vision.preprocessor, vlm.projector.geometry
    if pre.shortest_edge is not None and pre.shortest_edge != geometry.tile_size:
        # LLaVA-NeXT resizes every tile to the shortest edge before its center crop
        raise ValueError(
            f"LLaVA-NeXT would resize {geometry.tile_size} px tiles to the tower's shortest edge "
            f"{pre.shortest_edge} before cropping; only towers whose resize equals their crop "
            "export exactly"
        )


def llava_next_config(vlm: VisionLanguageModel) -> LlavaNextConfig:
    """LLaVA's config of `vlm` (`llava.llava_config`) with the pinpoints of its tiling."""
    check_anyres_convertible(vlm)
    base = llava_config(vlm, image_seq_length=vlm.projector.geometry.base_tokens)
    return LlavaNextConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_index=base.image_token_id,
        image_seq_length=base.image_seq_length,
        projector_hidden_act=base.projector_hidden_act,
        vision_feature_select_strategy=base.vision_feature_select_strategy,
        vision_feature_layer=base.vision_feature_layer,
        multimodal_projector_bias=base.multimodal_projector_bias,
        tie_word_embeddings=base.tie_word_embeddings,
        image_grid_pinpoints=[list(p) for p in vlm.projector.geometry.pinpoints],
    )


def llava_next_state_dict(vlm: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Every weight of `vlm` under `LlavaNextForConditionalGeneration`'s names."""
    check_anyres_convertible(vlm)
    state = llava_state_dict(vlm, fixed_grid=False)
    state[NEWLINE_KEY] = state.pop(PROJECTOR_PREFIX + "image_newline")
    return state


def llava_next_image_processor(vlm: VisionLanguageModel) -> LlavaNextImageProcessorPil:
    """The tower's preprocessing with LLaVA-NeXT's tiling: tiles cut at `crop_size` (also for
    SigLIP, which does not crop), patch counts padded so images of other grids batch."""
    tile = vlm.projector.geometry.tile_size
    settings = image_processor_settings(vlm.vision.preprocessor)
    settings.update(
        do_pad=True,
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in vlm.projector.geometry.pinpoints],
    )
    return LlavaNextImageProcessorPil(**settings)


def llava_next_processor(
    vlm: VisionLanguageModel, tokenizer, image_token: str, system_prompt: str
) -> LlavaNextProcessor:
    """The processor of the exported model; `tokenizer` is the exported (fast) one."""
    tower = vlm.vision.model.config
    return LlavaNextProcessor(
        image_processor=llava_next_image_processor(vlm),
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=SELECT_STRATEGY[tower.model_type],
        chat_template=chat_template(image_token, system_prompt),
        image_token=image_token,
        num_additional_image_tokens=CLASS_TOKENS[tower.model_type],
    )


@torch.no_grad()
def build_llava_next(
    vlm: VisionLanguageModel, dtype: torch.dtype
) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT whose parameters are `vlm`'s tensors in `dtype`, built on the meta device."""
    state = {name: tensor.to(dtype) for name, tensor in llava_next_state_dict(vlm).items()}
    config = llava_next_config(vlm)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def write_llava_next(
    vlm: VisionLanguageModel,
    tokenizer,
    out_dir: str | Path,
    *,
    system_prompt: str,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    notes: dict[str, list[str]] | None = None,
) -> Path:
    """Write an anyres `vlm` (LoRA already merged) as a LLaVA-NeXT directory: weights, config,
    processor, generation config; `notes` ({key: lines}) go into config.json. Atomic: OUT_DIR is
    absent, the old one, or the whole new one."""
    check_destination(out_dir, overwrite=overwrite, flag="OUT_DIR")
    model = build_llava_next(vlm, DTYPES[dtype])
    for key, lines in (notes or {}).items():
        setattr(model.config, key, lines)
    image_token = tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    exported_tokenizer = export_tokenizer(tokenizer)
    processor = llava_next_processor(vlm, exported_tokenizer, image_token, system_prompt)
    exported_tokenizer.chat_template = processor.chat_template  # servers may read either
    model.generation_config = GenerationConfig(
        eos_token_id=chat_stop_token_ids(tokenizer),
        pad_token_id=exported_tokenizer.pad_token_id,
        do_sample=False,
    )
    with atomic_directory(out_dir, overwrite=overwrite, flag="OUT_DIR") as staging:
        state = saved_layout(model.state_dict())
        model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        readable_weights(staging)
    return Path(out_dir)
