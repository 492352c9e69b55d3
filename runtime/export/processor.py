"""The exported `LlavaProcessor`: the tower's image preprocessing and our tokenizer + chat template.

`visual.preprocessing.ImagePreprocessor` owns the constants (mean, std, resize, crop, resample,
pad-to-square); this file only spells them in `LlavaImageProcessor` terms. The LLaVA image
processor runs the same steps in the same order (pad to a square with the mean colour, resize,
center-crop, rescale, normalise); its PIL backend resizes with PIL as ours does, so pixel_values
agree to float rounding. `LlavaProcessor` expands each placeholder token to
(H / patch)^2 (+ 1 class token, - 1 for CLIP's "default" strategy) = N copies, our N.
"""

from __future__ import annotations

from transformers import LlavaImageProcessorPil, LlavaProcessor

from model.vlm import VisionLanguageModel
from runtime.export.llava import CLASS_TOKENS, SELECT_STRATEGY, tokens_per_image
from runtime.export.tokenizer import chat_template
from visual.preprocessing import ImagePreprocessor


def image_processor(preprocessor: ImagePreprocessor) -> LlavaImageProcessorPil:
    """`LlavaImageProcessor` settings equal to `preprocessor`'s (PIL backend, as ours)."""
    return LlavaImageProcessorPil(**image_processor_settings(preprocessor))


def image_processor_settings(preprocessor: ImagePreprocessor) -> dict:
    """`preprocessor`'s steps in the keyword arguments of transformers' image processors."""
    if preprocessor.shortest_edge is not None:  # CLIP: short side, then a center crop
        size = {"shortest_edge": preprocessor.shortest_edge}
    else:  # SigLIP: straight to (H, W), aspect ratio ignored
        height, width = preprocessor.resize_size
        size = {"height": height, "width": width}
    crop = preprocessor.crop_size
    return dict(
        do_pad=preprocessor.pad_to_square,
        do_resize=True,
        size=size,
        resample=preprocessor.resample,
        do_center_crop=crop is not None,
        crop_size={"height": crop[0], "width": crop[1]} if crop else None,
        do_rescale=True,
        rescale_factor=preprocessor.rescale_factor,
        do_normalize=True,
        image_mean=list(preprocessor.mean),
        image_std=list(preprocessor.std),
        do_convert_rgb=True,
    )


def llava_processor(
    vlm: VisionLanguageModel, tokenizer, image_token: str, system_prompt: str
) -> LlavaProcessor:
    """The processor of the exported model; `tokenizer` is the exported (fast) one."""
    tower = vlm.vision.model.config
    processor = LlavaProcessor(
        image_processor=image_processor(vlm.vision.preprocessor),
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=SELECT_STRATEGY[tower.model_type],
        chat_template=chat_template(image_token, system_prompt),
        image_token=image_token,
        num_additional_image_tokens=CLASS_TOKENS[tower.model_type],
    )
    grid = tower.image_size // tower.patch_size
    tokens = tokens_per_image(vlm)
    if processor.image_token_id != vlm.image_token_id or grid * grid != tokens:
        raise ValueError(
            f"LlavaProcessor would put {grid * grid} x id {processor.image_token_id} per image, "
            f"the model expects {tokens} x id {vlm.image_token_id}"
        )
    return processor
