"""AnyRes end to end on the tiny models: `train.py --image_aspect_ratio anyres` (CLIP without
packing, SigLIP with packing and --group_by_length) on images of several sizes, several images per
record and text-only records; the checkpoint answers through test.py and `InferenceSession`
alike; `python -m runtime.export` writes a LlavaNextForConditionalGeneration that transformers
alone (a process that cannot import this project) runs to our greedy answers and fp32 logits, on
a wide image (unpadding removes feature rows) and a tall one (columns); GGUF refuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import answer_of_test_py, train_flags
from PIL import Image

import train
from model.anyres import AnyResProjector
from runtime.export.__main__ import main as export_main
from runtime.inference import GenerationSettings, InferenceSession
from visual.anyres import AnyResImageProcessor

pytestmark = pytest.mark.slow  # two trainings and two exports of a 151k-token vocabulary

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
# (width, height): wide, tall, square, very wide, very tall, a 1-pixel-ish extreme
TRAIN_SIZES = [(60, 20), (20, 60), (48, 48), (100, 30), (30, 100), (17, 33), (3, 1)]
HELD_OUT = {"wide": (70, 10), "tall": (10, 70)}  # rows unpadded, columns unpadded
QUESTION = "What colour is it?"
GREEDY = GenerationSettings(max_new_tokens=8)  # as test.py with --max_new_tokens 8


def _image(folder: Path, name: str, size: tuple[int, int], colour: str) -> str:
    Image.new("RGB", size, COLOURS[colour]).save(folder / name)
    return name


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_anyres_data(folder: Path) -> Path:
    """One-image, two-image and text-only records over several image sizes; returns train.json."""
    colours = list(COLOURS)
    records = []
    for index, size in enumerate(TRAIN_SIZES):
        colour = colours[index % 3]
        name = _image(folder, f"train{index}.png", size, colour)
        records.append({"id": f"one{index}", "image": name,
                        "conversations": _turns(f"<image>\n{QUESTION}", colour)})  # fmt: skip
    pair = [_image(folder, f"pair{i}.png", TRAIN_SIZES[i], colours[i]) for i in range(2)]
    records.append({"id": "two", "image": pair,
                    "conversations": _turns("<image>\n<image>\nThe colours?", "red, green")})  # fmt: skip
    records += [{"id": f"text{i}", "conversations": _turns("Name a colour.", c)}
                for i, c in enumerate(colours)]  # fmt: skip
    for name, size in HELD_OUT.items():
        _image(folder, f"{name}.png", size, "blue")
    path = folder / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def anyres_runs(tiny_qwen_dir, tiny_clip_dir, tmp_path_factory) -> dict[str, Path]:
    from demo.tiny_towers import save_tiny_siglip_tower

    work = tmp_path_factory.mktemp("anyres-runs")
    data = write_anyres_data(work)
    towers = {"clip": tiny_clip_dir, "siglip": save_tiny_siglip_tower(work / "tiny-siglip")}
    extra = {"clip": {}, "siglip": {"packing": True, "group_by_length": True}}
    runs = {}
    for family, tower in towers.items():
        out = work / family
        train.main(train_flags(tiny_qwen_dir, tower, data, work, out,
                               image_aspect_ratio="anyres", model_max_length=400, max_steps=4,
                               per_device_train_batch_size=3, lora_rank=4, lora_alpha=8,
                               learning_rate=1e-2, feature_proj_lr=1e-2, seed=3,
                               **extra[family]))  # fmt: skip
        runs[family] = out
    return runs


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_anyres_run_trains_and_its_checkpoint_answers_as_test_py(family, anyres_runs):
    out = anyres_runs[family]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite, logged every step
    config = json.loads((out / "vlm_config.json").read_text())
    assert config["vision"]["image_aspect_ratio"] == "anyres"
    session = InferenceSession.from_checkpoint(out, dtype="float32", settings=GREEDY)
    assert isinstance(session.vlm.projector, AnyResProjector)
    assert isinstance(session.vlm.image_processor, AnyResImageProcessor)
    for name in HELD_OUT:
        image = out.parent / f"{name}.png"
        ours = session.answer(["user"], [f"<image>\n{QUESTION}"], [image])
        assert answer_of_test_py(out, image, QUESTION) == ours


HF_SIDE = textwrap.dedent("""
    import json, sys, torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    job = json.load(open(sys.argv[1]))
    processor = AutoProcessor.from_pretrained(job["dir"], backend="pil")
    model = LlavaNextForConditionalGeneration.from_pretrained(job["dir"]).eval()
    results = {"class": type(model).__name__}
    for name, path in job["images"].items():
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": job["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[Image.open(path)], text=text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
            new = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        results[name] = {"input_ids": inputs["input_ids"], "image_sizes": inputs["image_sizes"],
                         "logits": logits, "new": new[:, inputs["input_ids"].shape[1]:]}
    results["project_modules"] = sorted(
        {"qwen", "runtime", "model", "visual", "dataset"} & set(sys.modules))
    torch.save(results, job["result"])
""")


def _transformers_alone(export: Path, images: dict[str, Path], work: Path) -> dict:
    job = {"dir": str(export), "question": QUESTION, "result": str(work / "hf.pt"),
           "images": {name: str(path) for name, path in images.items()}}  # fmt: skip
    (work / "job.json").write_text(json.dumps(job))
    (work / "hf_side.py").write_text(HF_SIDE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", str(work / "hf_side.py"), str(work / "job.json")],
        cwd=work, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "hf.pt")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_export_is_llava_next_and_transformers_alone_answers_as_we_do(
    family, anyres_runs, tmp_path
):
    out = anyres_runs[family]
    export = tmp_path / "llava-next"
    export_main([str(out), str(export), "--dtype", "float32"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    images = {name: out.parent / f"{name}.png" for name in HELD_OUT}
    theirs = _transformers_alone(export, images, tmp_path)
    assert theirs["class"] == "LlavaNextForConditionalGeneration"
    assert theirs["project_modules"] == []
    session = InferenceSession.from_checkpoint(out, dtype="float32", settings=GREEDY)
    stops = set(json.loads((export / "generation_config.json").read_text())["eos_token_id"])
    geometry = session.vlm.projector.geometry
    grids = {name: geometry.tile_grid((h, w)) for name, (w, h) in HELD_OUT.items()}
    windows = {name: geometry.feature_window((h, w)) for name, (w, h) in HELD_OUT.items()}
    side = geometry.patch_side
    assert windows["wide"][1] - windows["wide"][0] < grids["wide"][0] * side  # rows removed
    assert windows["tall"][3] - windows["tall"][2] < grids["tall"][1] * side  # columns removed
    for name, path in images.items():
        picture = Image.open(path)
        ids = torch.tensor([session.prompt_ids(["user"], [f"<image>\n{QUESTION}"],
                                               image_sizes=[(picture.height, picture.width)])])  # fmt: skip
        inputs = session.processor.image_inputs([picture])
        assert torch.equal(theirs[name]["input_ids"], ids)
        assert theirs[name]["image_sizes"].tolist() == inputs["image_sizes"].tolist()
        with torch.no_grad():
            logits = session.vlm(ids, **inputs).logits  # [1, T, V]
        assert logits.abs().max() > 0.1
        assert (theirs[name]["logits"] - logits).abs().max() <= 1e-5, name
        answer = session.answer(["user"], [f"<image>\n{QUESTION}"], [path])
        assert session.reply_text(theirs[name]["new"][0].tolist(), stops) == answer, name
        assert answer_of_test_py(out, path, QUESTION) == answer


def test_the_gguf_export_refuses_an_anyres_checkpoint_in_one_line(anyres_runs, tmp_path, caplog):
    out = tmp_path / "gguf"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(anyres_runs["clip"]), str(out), "--format", "gguf"])
    assert exit_info.value.code == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "anyres" in message and "--format hf" in message and "\n" not in message
    assert not out.exists()


def test_stats_of_an_anyres_checkpoint_count_by_image_size(anyres_runs, capsys):
    from dataprocess.__main__ import main as dataprocess_main

    out = anyres_runs["siglip"]
    data = out.parent / "train.json"
    argv = ["stats", "--data", str(data), "--model_weights", str(out),
            "--image_folder", str(out.parent), "--histogram", str(out.parent / "h.png")]  # fmt: skip
    assert dataprocess_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.split("\nreport")[0])
    assert summary["num_image_tokens_from"] == "--model_weights (anyres)"
    session = InferenceSession.from_checkpoint(out, dtype="float32")
    records = json.loads(data.read_text())
    names = [n for r in records for n in ([r["image"]] if isinstance(r.get("image"), str)
                                          else r.get("image", []))]  # fmt: skip
    sizes = [Image.open(out.parent / name).size for name in names]
    counts = session.processor.image_token_counts([(h, w) for w, h in sizes])
    by_tokens = {str(t): counts.count(t) for t in sorted(set(counts))}
    assert summary["image_tokens"]["images_by_tokens"] == by_tokens and len(by_tokens) > 2
