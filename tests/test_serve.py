"""The API server (`python -m runtime.serve`) driven by the official `openai` client.

A tiny random checkpoint is served in-process on a free 127.0.0.1 port. Its answers to held-out
shapes questions equal test.py's; streamed chunks join to the plain answer; multi-turn and
multi-image requests answer as the session does; concurrent requests share a batch and still get
their one-at-a-time answers. The error cases (their status and OpenAI error shape, the server
still serving after each) are in tests/test_serve_errors.py.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.builder import build_vlm
from model.checkpoint import describe, save_trainable
from model.config import LanguageModelConfig, LoraSettings, ProjectorConfig, VisionConfig
from model.trainable import configure_trainable
from runtime.inference import GenerationSettings, InferenceSession

openai = pytest.importorskip("openai", reason="openai is not installed (requirements.txt)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (requirements-web.txt)")
from runtime.serve.app import build_app  # noqa: E402 - needs fastapi
from runtime.serve.config import ServeConfig  # noqa: E402
from runtime.serve.scheduler import BatchScheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8
KEY = "test-key"
pytestmark = pytest.mark.slow  # a model and a server per module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir) -> Path:
    """A tiny random checkpoint, built as tests/test_web_browser.py builds one."""
    language = LanguageModelConfig(language_model=str(tiny_qwen_dir), dtype="float32")
    vision = VisionConfig(vision_model=str(tiny_clip_dir))
    torch.manual_seed(0)
    vlm, tokenizer = build_vlm(language, vision, ProjectorConfig())
    configure_trainable(vlm, LoraSettings(lora_rank=4))
    description = describe(vlm, language, vision, ProjectorConfig(), system_prompt="s")
    out = tmp_path_factory.mktemp("serve-ckpt")
    save_trainable(vlm, tokenizer, out, description)
    return out


@pytest.fixture(scope="module")
def session(checkpoint) -> InferenceSession:
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    return InferenceSession.from_checkpoint(checkpoint, dtype="float32", settings=settings)


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@pytest.fixture(scope="module")
def server(session, shapes_dir):
    config = ServeConfig(model_name="tiny", api_key=KEY, default_max_tokens=MAX_NEW_TOKENS,
                         batch_window_s=0.2, allowed_local_media_path=shapes_dir)  # fmt: skip
    with serving(session, config) as (url, scheduler):
        yield url, scheduler


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server[0])


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def ask(client, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def question(image: Path, text: str) -> list[dict]:
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]


def test_answers_equal_test_py(client, checkpoint, shapes_dir):
    for index in (0, 1):
        image, text = held_out(shapes_dir, index)
        reply = ask(client, question(image, text))
        assert reply.choices[0].message.content == answer_of_test_py(checkpoint, image, text)
        assert reply.model == "tiny" and reply.object == "chat.completion"
        assert reply.usage.prompt_tokens > 16 and 1 <= reply.usage.completion_tokens <= 8
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_local_file_under_the_allowed_folder_answers_as_its_data_url(client, shapes_dir):
    image, text = held_out(shapes_dir, 2)
    inline = ask(client, question(image, text)).choices[0].message.content
    for url in (image.as_uri(), str(image.relative_to(shapes_dir))):
        part = {"type": "image_url", "image_url": {"url": url}}
        local = ask(client, [{"role": "user", "content": [part, {"type": "text", "text": text}]}])
        assert local.choices[0].message.content == inline


def test_streamed_chunks_join_to_the_answer(client, shapes_dir):
    image, text = held_out(shapes_dir, 0)
    plain = ask(client, question(image, text))
    chunks = list(ask(client, question(image, text), stream=True,
                      stream_options={"include_usage": True}))  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_a_stop_string_cuts_the_answer_streamed_or_not(client, shapes_dir):
    image, text = held_out(shapes_dir, 1)
    full = ask(client, question(image, text)).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = ask(client, question(image, text), stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = ask(client, question(image, text), stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]


def test_max_tokens_ends_with_length(client, session, shapes_dir):
    image, text = held_out(shapes_dir, 0)
    reply = ask(client, question(image, text), max_completion_tokens=2)
    expected = session.answer(["user"], [f"<image>\n{text}"], [image],
                              GenerationSettings(max_new_tokens=2))  # fmt: skip
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"


def test_multi_turn_multi_image_and_a_system_message(client, session, shapes_dir):
    (first, q1), (second, q2) = held_out(shapes_dir, 0), held_out(shapes_dir, 1)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [image_part(first), image_part(second), {"type": "text", "text": q1}],
        },  # fmt: skip
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": q2},
    ]
    reply = ask(client, messages).choices[0].message.content
    expected = session.answer(["user", "assistant", "user"],
                              [f"<image>\n<image>\n{q1}", "a circle", q2], [first, second],
                              system_prompt="Answer briefly.")  # fmt: skip
    assert reply == expected


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(server, client, session,
                                                                     shapes_dir):  # fmt: skip
    _, scheduler = server
    asks = [(*held_out(shapes_dir, i % 8), 2 + i % 3) for i in range(6)]  # mixed max_tokens
    alone = [session.answer(["user"], [f"<image>\n{text}"], [image],
                            GenerationSettings(max_new_tokens=limit))
             for image, text, limit in asks]  # fmt: skip
    before = sum(count for size, count in scheduler.batch_sizes.items() if size > 1)
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda a: ask(client, question(a[0], a[1]), max_tokens=a[2]), asks))
    assert [r.choices[0].message.content for r in replies] == alone
    assert sum(count for size, count in scheduler.batch_sizes.items() if size > 1) > before


def test_a_seed_makes_sampling_repeatable(client, shapes_dir):
    image, text = held_out(shapes_dir, 3)
    answers = {ask(client, question(image, text), temperature=1.5, seed=7,
                   max_tokens=MAX_NEW_TOKENS).choices[0].message.content for _ in range(2)}  # fmt: skip
    assert len(answers) == 1


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    import httpx

    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"  # no key needed
