"""What the API server's tests share (besides conftest's checkpoint, held-out questions and test.py's
answer): the app served in-process on a free 127.0.0.1 port, and the official client."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from pathlib import Path

import openai
import uvicorn
from conftest import free_port

from runtime.serve.app import build_app
from runtime.serve.config import ServeConfig
from runtime.serve.scheduler import BatchScheduler

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8
KEY = "test-key"


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
