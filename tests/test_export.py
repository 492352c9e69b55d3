"""`python -m runtime.export`: the exported LLaVA directory loads with transformers alone and gives
our logits, prompt ids and pixel values; the export is deterministic, refuses what LLaVA cannot
hold and damaged checkpoints before writing anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import truncate
from PIL import Image
from transformers import AutoProcessor, Qwen2Config, Qwen2ForCausalLM

from demo.tiny_towers import save_tiny_open_clip_tower, save_tiny_siglip_tower
from model.builder import build_vlm
from model.checkpoint import CheckpointError, describe, save_trainable
from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
from model.trainable import configure_trainable
from qwen.tokenization_qwen import SPECIAL_TOKENS, QWenTokenizer
from runtime.export import export_checkpoint
from runtime.export.tokenizer import qwen_fast_tokenizer
from runtime.inference import InferenceSession

pytestmark = pytest.mark.slow  # each export converts a 151k-token vocabulary and writes ~80 MB

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You answer questions about shapes."
QWEN2_LORA = "q_proj|k_proj|v_proj|gate_proj|up_proj"
CASES = [("qwen", "clip"), ("qwen", "siglip"), ("qwen2", "clip"), ("qwen2", "siglip")]
# (roles, contents as our records hold them, the same conversation as transformers' messages)
TURNS = (
    ["user", "assistant", "user"],
    ["<image>\nWhat shape is it?", "A red circle.", "<image>\n它是什么颜色？ 2 shapes"],
)


def messages(roles, contents, system=None) -> list[dict]:
    """Our turns as transformers chat messages: each leading `<image>\\n` becomes an image item."""
    out = [{"role": "system", "content": system}] if system else []
    for role, content in zip(roles, contents, strict=True):
        items = []
        while content.startswith("<image>\n"):
            items.append({"type": "image"})
            content = content[len("<image>\n") :]
        out.append({"role": role, "content": [*items, {"type": "text", "text": content}]})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def images(work) -> list[Path]:
    """Two square images of different sizes (non-square ones: test_non_square_images_...)."""
    rng = np.random.default_rng(0)
    paths = []
    for index, side in enumerate((48, 64)):
        path = work / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bases(work, tiny_qwen_dir, tiny_clip_dir) -> dict[str, Path]:
    """The base models: QWen, a tiny transformers Qwen2 (tokenizer: the exported QWen one)."""
    qwen2 = work / "tiny-qwen2"
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(qwen2)
    qwen_fast_tokenizer(QWenTokenizer()).save_pretrained(qwen2)
    siglip = save_tiny_siglip_tower(work / "tiny-siglip")
    return {"qwen": tiny_qwen_dir, "qwen2": qwen2, "clip": tiny_clip_dir, "siglip": siglip}


def make_checkpoint(out: Path, bases: dict, llm: str, vision: VisionConfig, projector=None) -> Path:
    """A trained-looking checkpoint: LoRA B drawn at random, so a lost adapter would show."""
    qwen2, llm_dir = llm == "qwen2", bases[llm]
    language = LanguageModelConfig(language_model=str(llm_dir), dtype="float32",
                                   image_token="<|extra_0|>" if qwen2 else None)  # fmt: skip
    projector = projector or ProjectorConfig()
    torch.manual_seed(0)
    vlm, tokenizer = build_vlm(language, vision, projector)
    lora = LoraSettings(lora_rank=4, target_modules=QWEN2_LORA if qwen2 else "c_attn|w1|w2")
    configure_trainable(vlm, lora)
    description = describe(vlm, language, vision, projector, system_prompt=SYSTEM)
    with torch.no_grad():
        for name, param in vlm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    save_trainable(vlm, tokenizer, out, description)
    return out


@pytest.fixture(scope="module")
def exports(work, bases) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(checkpoint, fp32 export) for every case."""
    found = {}
    for llm, tower in CASES:
        name = f"{llm}-{tower}"
        checkpoint = make_checkpoint(work / name, bases, llm, VisionConfig(str(bases[tower])))
        found[llm, tower] = (
            checkpoint,
            export_checkpoint(checkpoint, work / f"{name}-llava", dtype="float32"),
        )
    return found


HF_SIDE = textwrap.dedent("""
    import json, sys, torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        processor = AutoProcessor.from_pretrained(job["dir"], backend="pil")
        model = LlavaForConditionalGeneration.from_pretrained(job["dir"]).eval()
        text = processor.apply_chat_template(job["messages"], add_generation_prompt=True)
        images = [Image.open(path).convert("RGB") for path in job["images"]]
        inputs = processor(images=images, text=text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
            new = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = new[:, inputs["input_ids"].shape[1]:]
        project = sorted({"qwen", "runtime", "model", "visual", "dataset"} & set(sys.modules))
        torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                    "logits": logits, "new": new, "project_modules": project}, job["result"])
""")


@pytest.fixture(scope="module")
def transformers_results(work, exports, images) -> dict:
    """Every export run by transformers in one subprocess that cannot import this project."""
    jobs = [
        {"dir": str(out), "messages": messages(*TURNS), "images": [str(p) for p in images],
         "result": str(work / f"{llm}-{tower}.pt")}
        for (llm, tower), (_, out) in exports.items()
    ]  # fmt: skip
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "hf_side.py").write_text(HF_SIDE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", str(work / "hf_side.py"), str(work / "jobs.json")],
        cwd=work, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: torch.load(work / f"{'-'.join(case)}.pt") for case in exports}


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_transformers_alone_gives_our_logits_and_answers(
    case, exports, transformers_results, images
):
    theirs = transformers_results[case]
    assert theirs["project_modules"] == []
    session = InferenceSession.from_checkpoint(exports[case][0], dtype="float32")
    input_ids = torch.tensor([session.prompt_ids(*TURNS)])  # [1, T]
    pixel_values = session.vlm.vision.preprocess([Image.open(p) for p in images])
    assert torch.equal(theirs["input_ids"], input_ids)
    assert torch.allclose(theirs["pixel_values"], pixel_values, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = session.vlm(input_ids, pixel_values=pixel_values).logits  # [1, T, V]
    assert logits.abs().max() > 0.1
    assert (theirs["logits"] - logits).abs().max() <= 1e-4
    generation = json.loads((exports[case][1] / "generation_config.json").read_text())
    ours = session.vlm.generate(
        input_ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False,
        eos_token_id=generation["eos_token_id"], pad_token_id=generation["pad_token_id"],
    )  # fmt: skip
    assert theirs["new"].tolist() == ours.tolist()


CONVERSATIONS = [
    (["user"], ["<image>\nWhat shape is it?"], None),
    (*TURNS, None),
    (["user", "assistant", "user"], ["Hello", "Hi.", "<image>\nAnd now?"], "Be brief."),
    (["user"], ["No image here: 12345, café, 形状。"], None),
]


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_processor_gives_our_prompt_ids_and_pixels(tower, exports, images):
    checkpoint, out = exports["qwen", tower]
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    session = InferenceSession.from_checkpoint(checkpoint, dtype="float32")
    for roles, contents, system in CONVERSATIONS:
        pictures = [Image.open(p) for p in images[: sum(c.count("<image>") for c in contents)]]
        text = processor.apply_chat_template(
            messages(roles, contents, system), add_generation_prompt=True
        )
        inputs = processor(images=pictures or None, text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == session.prompt_ids(roles, contents, system)
        if pictures:
            ours = session.vlm.vision.preprocess(pictures)
            assert torch.allclose(inputs["pixel_values"], ours, rtol=0, atol=1e-6)
    # a string content with the <image> marker, as test.py writes it, renders the same
    as_string = [{"role": "user", "content": "<image>\nWhat shape is it?"}]
    text = processor.apply_chat_template(as_string, add_generation_prompt=True)
    ids = processor(images=[Image.open(images[0])], text=text)["input_ids"][0]
    assert ids == session.prompt_ids(["user"], ["<image>\nWhat shape is it?"])


def test_fast_tokenizer_gives_qwen_tokenizer_ids():
    ours, fast = QWenTokenizer(), qwen_fast_tokenizer(QWenTokenizer())
    texts = ["Picture 1: ", "\nGenerate the caption in English with grounding:",
             "你是一位图像理解助手。", "用中文回答：", "2024-05-06: 1234 apples\n\n  spaced\ttab",
             "cafe\u0301 \u212b NFC", "emoji 🙂 and ｆｕｌｌ width"]  # fmt: skip
    for text in texts:
        assert fast(text, add_special_tokens=False)["input_ids"] == ours.encode_ids(text), text
    specials = fast.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert specials == list(range(151643, 151643 + len(SPECIAL_TOKENS)))
    chat = "<|im_start|>user\n<|extra_0|>\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert fast(chat)["input_ids"] == ours.encode_ids(chat, allowed_special="all")
    assert fast.decode(ours.encode_ids(texts[2])) == texts[2]


def test_non_square_images_pad_like_training(exports, work):
    checkpoint, out = exports["qwen", "clip"]
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    session = InferenceSession.from_checkpoint(checkpoint, dtype="float32")
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    theirs = processor.image_processor(wide, return_tensors="pt")["pixel_values"]
    ours = session.vlm.vision.preprocess([wide])
    assert session.vlm.vision.preprocessor.pad_to_square
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-6)


def test_export_is_byte_identical_sharded_and_in_the_dtype(exports, work):
    checkpoint, _ = exports["qwen", "clip"]
    first, second = work / "bf16-a", work / "bf16-b"
    for out in (first, second):
        export_checkpoint(checkpoint, out, max_shard_size="30MB")
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1 and (first / "model.safetensors.index.json").is_file()
    for name in [*shards, "model.safetensors.index.json", "config.json", "tokenizer.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weight_map = json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    layout = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.",
              "vision_tower.vision_model.")  # fmt: skip
    assert all(name.startswith(layout) for name in weight_map)  # the llava-hf checkpoints' names
    config = json.loads((first / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["text_config"]["model_type"] == "qwen2"
    assert config["text_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert any("dynamic NTK" in note for note in config["export_notes"])
    generation = json.loads((first / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151644, 151643]
    assert generation["pad_token_id"] == 151643


def test_a_damaged_checkpoint_is_named_and_nothing_is_written(exports, work):
    damaged = Path(shutil.copytree(exports["qwen", "clip"][0], work / "damaged"))
    truncate(damaged / "projector.safetensors")
    out = work / "from-damaged" / "llava"
    with pytest.raises(CheckpointError, match="projector.safetensors: damaged"):
        export_checkpoint(damaged, out, dtype="float32")
    assert not (work / "from-damaged").exists() or not any((work / "from-damaged").iterdir())


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.export", *args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_what_llava_cannot_hold_is_refused_before_writing(work, bases):
    resampler = make_checkpoint(
        work / "resampler", bases, "qwen", VisionConfig(str(bases["clip"])),
        ProjectorConfig(projector_type="resampler", num_queries=4),
    )  # fmt: skip
    result = run_export(str(resampler), str(work / "resampler-llava"))
    assert result.returncode == 2
    assert "projector is 'resampler'" in result.stderr and "mlp2x_gelu" in result.stderr
    open_clip = save_tiny_open_clip_tower(work / "tiny-open-clip")
    vision = VisionConfig(str(open_clip), vision_library="open_clip")
    checkpoint = make_checkpoint(work / "open-clip", bases, "qwen", vision)
    with pytest.raises(ValueError, match="vision tower comes from 'open_clip'.*CLIP or SigLIP"):
        export_checkpoint(checkpoint, work / "open-clip-llava")
    assert not (work / "resampler-llava").exists() and not (work / "open-clip-llava").exists()


def test_a_busy_destination_is_refused_unless_overwrite(exports, work):
    busy = work / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        export_checkpoint(exports["qwen", "clip"][0], busy)
    assert (busy / "keep.txt").read_text() == "a user's file"
