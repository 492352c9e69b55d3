"""The GGUF export run by llama.cpp itself (llama-cpp-python + mtmd, CPU): our prompt ids, our
first-token logits, our greedy answers. Needs `bash tools/install.sh --gguf`; skipped, with that
command in the reason, where llama_cpp does not import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.export_parity import load_records
from bench.gguf_parity import run as parity
from model.config import VisionConfig
from runtime.export.gguf_export import export_gguf
from runtime.inference import InferenceSession
from tests.test_export import make_checkpoint

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (bash tools/install.sh --gguf): the GGUF export is "
    "NOT checked in llama.cpp",
)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Largest |logit difference| allowed at the first generated token, f32 export and f32 KV cache
# (docs/GGUF.md): measured at most 2e-4 on the tiny models here; the gap is llama.cpp's
# tanh-approximated GELU in the projector (ours is the exact erf GELU) and its summation order.
LOGIT_TOLERANCE = 1e-3
CONVERSATIONS = {
    "text": (["user"], ["Which shapes are red? 2 or 3, 它们是什么颜色？"], 0),
    "image": (
        ["user", "assistant", "user"],
        ["<image>\nWhat shape is it?", "A red circle.", "And where is it?"],
        1,
    ),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-llama-cpp")


@pytest.fixture(scope="module")
def checkpoint(work, tiny_qwen_dir, tiny_clip_dir):
    bases = {"qwen": tiny_qwen_dir, "clip": tiny_clip_dir}
    return make_checkpoint(work / "qwen-clip", bases, "qwen", VisionConfig(str(tiny_clip_dir)))


@pytest.fixture(scope="module")
def runner(work, checkpoint):
    from runtime.export.llama_cpp_runner import LlamaCppVLM

    return LlamaCppVLM(export_gguf(checkpoint, work / "f32", outtype="f32"), f32_cache=True)


@pytest.fixture(scope="module")
def session(checkpoint):
    return InferenceSession.from_checkpoint(checkpoint, dtype="float32")


@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_llama_cpp_reads_our_prompt_and_gives_our_first_token_logits(runner, session, kind):
    roles, contents, n_images = CONVERSATIONS[kind]
    rng = np.random.default_rng(0)  # at the tower's 32 px: no resampling on either side
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))] * n_images
    ours = session.prompt_ids(roles, contents)
    theirs = runner.prefill(runner.prompt_text(roles, contents), images)
    assert theirs == [i for i in ours if i != session.vlm.image_token_id]
    with torch.no_grad():
        pixels = session.vlm.vision.preprocess(images) if images else None
        logits = session.vlm(input_ids=torch.tensor([ours]), pixel_values=pixels).logits[0, -1]
    difference = np.abs(runner.last_logits() - logits.numpy()).max()
    print(f"{kind}: max |logit difference| {difference:.2e}")
    assert difference < LOGIT_TOLERANCE
    assert int(np.argmax(runner.last_logits())) == int(logits.argmax())


def test_llama_cpp_answers_the_shapes_records_as_we_do(work, checkpoint, shapes_dir):
    records = load_records(shapes_dir / "test.json", shapes_dir, None)
    report = parity(checkpoint, records, export_dir=work / "f32", max_new=8)
    n, identical = report["records"], report["identical_answers"]
    print(f"identical answers: {identical}/{n}")
    assert identical == n, report["differing"]


@pytest.mark.skipif(
    not (ROOT / "outputs" / "demo").is_dir(), reason="no outputs/demo: run `sh train.sh` first"
)
def test_llama_cpp_matches_test_py_on_held_out_demo_records(work, monkeypatch):
    """The first 40 held-out records (bench.gguf_parity runs all 200: docs/GGUF.md)."""
    monkeypatch.chdir(ROOT)  # the demo checkpoint names its base models relative to the repo
    records = load_records(ROOT / "demo_assets/shapes/test.json", ROOT / "demo_assets/shapes", 40)
    report = parity(ROOT / "outputs" / "demo", records, export_dir=work / "demo")
    n, identical = report["records"], report["identical_answers"]
    print(f"demo: identical answers {identical}/{n}, exact match ours "
          f"{report['exact_match_ours']:.1%}, llama.cpp {report['exact_match_llama_cpp']:.1%}")  # fmt: skip
    assert abs(report["exact_match_ours"] - report["exact_match_llama_cpp"]) <= 0.02
    assert identical >= n - 1, report["differing"]
