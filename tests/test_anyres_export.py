"""The LLaVA-NeXT export of an anyres model (runtime/export/llava_next.py): the written directory
loads with transformers, its processor expands each image to our count, and its image features
and logits are ours."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from model.anyres import AnyResProjector
from model.vlm import VisionLanguageModel
from qwen import splice_image_features
from runtime.export.llava_next import llava_next_config, write_llava_next
from tests.anyres_helpers import IMAGE_TOKEN, hf_tower, word_tokenizer
from visual.anyres import AnyResImageProcessor, anyres_geometry

# very wide (feature rows unpadded), very tall (columns), 2x2, square, a 1x1-ish extreme
SIZES = [(10, 70), (70, 10), (100, 60), (64, 64), (1, 3)]


def _anyres_vlm(family: str):
    tower = hf_tower(family, 32, 8, hidden_size=16)
    tokenizer = word_tokenizer()
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=4, pad_token_id=0)  # fmt: skip
    llm = Qwen2ForCausalLM(config).eval()
    geometry = anyres_geometry(tower, [(32, 64), (64, 32), (64, 64), (32, 96), (96, 32)])
    projector = AnyResProjector(tower.hidden_size, 32, geometry)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return VisionLanguageModel(tower, projector, llm, image_token_id).eval(), tokenizer


def _images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_exported_llava_next_gives_our_counts_features_and_logits(family, tmp_path):
    vlm, tokenizer = _anyres_vlm(family)
    out = write_llava_next(vlm, tokenizer, tmp_path / "next", system_prompt="s", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == ("default" if family == "clip" else "full")
    model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    ours_processor = AnyResImageProcessor(vlm.projector.geometry, vlm.vision.preprocessor)
    images = _images()
    text = " hi ".join([IMAGE_TOKEN] * len(images))
    inputs = processor(text=text, images=images, return_tensors="pt")
    # the placeholder count per image is ours
    counts = [ours_processor.num_image_tokens(size) for size in SIZES]
    assert int((inputs["input_ids"] == vlm.image_token_id).sum()) == sum(counts)
    # our pixels, tower, projector and packing
    pixel_values = torch.cat([ours_processor.preprocess(image) for image in images])
    with torch.no_grad():
        rows = vlm.projector.pack(vlm.projector(vlm.vision(pixel_values)), SIZES)
        theirs = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
        assert (rows - torch.cat(theirs)).abs().max() <= 1e-5
        ids = inputs["input_ids"]
        embeds = vlm.llm.get_input_embeddings()(ids)
        ours = vlm.llm(inputs_embeds=splice_image_features(embeds, ids, rows, vlm.image_token_id))
        logits = model(**inputs).logits
    assert (ours.logits - logits).abs().max() <= 1e-5


def test_a_fixed_grid_model_is_not_a_llava_next():
    vlm, _ = _anyres_vlm("clip")
    from model.projector import MLPProjector

    vlm.projector = MLPProjector(16, 32, 16)
    with pytest.raises(ValueError, match="LLaVA-NeXT needs an anyres model"):
        llava_next_config(vlm)
