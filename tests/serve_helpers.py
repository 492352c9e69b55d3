"""What the API server's tests share: a tiny checkpoint, the held-out questions, test.py's
answer, the app served in-process on a free 127.0.0.1 port, and the official client."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import threading
import time
from pathlib import Path

import openai
import torch
import uvicorn
from conftest import free_port

from model.builder import build_vlm
from model.checkpoint import describe, save_trainable
from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
from model.trainable import configure_trainable
from runtime.serve.app import build_app
from runtime.serve.config import ServeConfig
from runtime.serve.scheduler import BatchScheduler

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8
KEY = "test-key"


def save_checkpoint(out: Path, tiny_qwen_dir: Path, tiny_clip_dir: Path) -> Path:
    """A tiny random checkpoint, built as tests/test_web_browser.py builds one."""
    language = LanguageModelConfig(language_model=str(tiny_qwen_dir), dtype="float32")
    vision = VisionConfig(vision_model=str(tiny_clip_dir))
    torch.manual_seed(0)
    vlm, tokenizer = build_vlm(language, vision, ProjectorConfig())
    configure_trainable(vlm, LoraSettings(lora_rank=4))
    description = describe(vlm, language, vision, ProjectorConfig(), system_prompt="s")
    save_trainable(vlm, tokenizer, out, description)
    return out


def held_out(shapes_dir: Path, index: int) -> tuple[Path, str]:
    """A test-split image and its first question (without the <image> marker)."""
    record = json.loads((shapes_dir / "test.json").read_text(encoding="utf-8"))[index]
    return shapes_dir / record["image"], record["conversations"][0]["value"].split("\n", 1)[1]


def answer_of_test_py(checkpoint: Path, image: Path, text: str) -> str:
    """What `python test.py --image_path IMAGE --prompt TEXT` prints as the answer."""
    spec = importlib.util.spec_from_file_location("prompt_test", REPO / "test.py")
    prompt_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prompt_test)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prompt_test.main(["--model_weights", str(checkpoint), "--dtype", "float32",
                          "--image_path", str(image), "--prompt", text,
                          "--max_new_tokens", str(MAX_NEW_TOKENS)])  # fmt: skip
    return out.getvalue().rstrip("\n").split("\t", 1)[1]


@contextlib.contextmanager
def serving(session, config: ServeConfig, scheduler: BatchScheduler | None = None):
    """The app on a free loopback port in a thread; yields (base url, scheduler)."""
    scheduler = scheduler or BatchScheduler(
        session, max_batch_size=config.max_batch_size, batch_window_s=config.batch_window_s,
        queue_size=config.queue_size,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(session, config, scheduler),
                                           host="127.0.0.1", port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - start < 30, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client_for(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def question(image: Path, text: str) -> list[dict]:
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]
