"""The LLaVA-NeXT export of an anyres model (runtime/export/llava_next.py): the written directory,
loaded by transformers in a process that cannot import this project, expands each image to our
count and gives our image features and logits."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.anyres import AnyResProjector
from model.projector import MLPProjector
from model.vlm import VisionLanguageModel
from qwen import splice_image_features
from runtime.export.llava_next import llava_next_config, write_llava_next
from tests.anyres_helpers import IMAGE_TOKEN, hf_tower, word_tokenizer
from visual.anyres import AnyResImageProcessor, anyres_geometry

FAMILIES = ["clip", "siglip"]
# very wide (feature rows unpadded), very tall (columns), 2x2, square, a 1x1-ish extreme
SIZES = [(10, 70), (70, 10), (100, 60), (64, 64), (1, 3)]
TEXT = " hi ".join([IMAGE_TOKEN] * len(SIZES))

HF_SIDE = textwrap.dedent("""
    import json, sys, torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    for job in json.load(open(sys.argv[1])):
        processor = AutoProcessor.from_pretrained(job["dir"], backend="pil")
        model = LlavaNextForConditionalGeneration.from_pretrained(job["dir"]).eval()
        images = [Image.open(path) for path in job["images"]]
        inputs = processor(text=job["text"], images=images, return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output
            logits = model(**inputs).logits
        project = sorted({"qwen", "runtime", "model", "visual", "dataset"} & set(sys.modules))
        torch.save({"input_ids": inputs["input_ids"], "image_sizes": inputs["image_sizes"],
                    "features": torch.cat(features), "logits": logits,
                    "class": type(model).__name__, "project_modules": project}, job["result"])
""")


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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{family: (our vlm, transformers' results)}: both exports run in one isolated subprocess."""
    work = tmp_path_factory.mktemp("anyres-export")
    rng = np.random.default_rng(5)
    images = []
    for index, (height, width) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(work / f"image{index}.png")
        Image.fromarray(pixels).save(images[-1])
    vlms, jobs = {}, []
    for family in FAMILIES:
        vlm, tokenizer = _anyres_vlm(family)
        out = write_llava_next(vlm, tokenizer, work / family, system_prompt="s", dtype="float32")
        vlms[family] = vlm
        jobs.append({"dir": str(out), "images": [str(p) for p in images], "text": TEXT,
                     "result": str(work / f"{family}.pt")})  # fmt: skip
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "hf_side.py").write_text(HF_SIDE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", str(work / "hf_side.py"), str(work / "jobs.json")],
        cwd=work, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pils = [Image.open(path) for path in images]
    return {f: (vlms[f], torch.load(work / f"{f}.pt"), pils, work / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_alone_gives_our_counts_features_and_logits(family, exported):
    vlm, theirs, images, out = exported[family]
    assert (
        theirs["project_modules"] == [] and theirs["class"] == "LlavaNextForConditionalGeneration"
    )
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == ("default" if family == "clip" else "full")
    assert theirs["image_sizes"].tolist() == [list(size) for size in SIZES]
    processor = AnyResImageProcessor(vlm.projector.geometry, vlm.vision.preprocessor)
    counts = [processor.num_image_tokens(size) for size in SIZES]
    input_ids = theirs["input_ids"]  # [1, T]
    assert int((input_ids == vlm.image_token_id).sum()) == sum(counts)
    pixel_values = torch.cat([processor.preprocess(image) for image in images])
    with torch.no_grad():
        rows = vlm.projector.pack(vlm.projector(vlm.vision(pixel_values)), SIZES)
        embeds = vlm.llm.get_input_embeddings()(input_ids)  # [1, T, Dl]
        embeds = splice_image_features(embeds, input_ids, rows, vlm.image_token_id)
        logits = vlm.llm(inputs_embeds=embeds).logits
    assert (rows - theirs["features"]).abs().max() <= 1e-5
    assert logits.abs().max() > 0.1
    assert (logits - theirs["logits"]).abs().max() <= 1e-5


def test_a_fixed_grid_model_is_not_a_llava_next():
    vlm, _ = _anyres_vlm("clip")
    vlm.projector = MLPProjector(16, 32, 16)
    with pytest.raises(ValueError, match="LLaVA-NeXT needs an anyres model"):
        llava_next_config(vlm)
