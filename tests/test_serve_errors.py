"""Every error of the API server: its status, the OpenAI error shape, and the server still
answering after it. Bad requests, a missing or wrong key, unknown models and routes, too-large
bodies and images, a full queue, a request past its timeout and a generation that fails."""

from __future__ import annotations

import base64
import io
import random
import threading
import time

import pytest
from PIL import Image

from runtime.inference import GenerationSettings, InferenceSession

openai = pytest.importorskip("openai", reason="openai is not installed (requirements.txt)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (requirements-web.txt)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (requirements-web.txt)")
from conftest import save_tiny_checkpoint as save_checkpoint  # noqa: E402
from serve_helpers import KEY, client_for, serving  # noqa: E402

from runtime.serve.config import ServeConfig  # noqa: E402 - needs fastapi
from runtime.serve.scheduler import BatchScheduler, Job  # noqa: E402

pytestmark = pytest.mark.slow  # a model and two servers


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir) -> InferenceSession:
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_qwen_dir, tiny_clip_dir)
    settings = GenerationSettings(max_new_tokens=2)
    return InferenceSession.from_checkpoint(checkpoint, dtype="float32", settings=settings)


LIMITS = dict(max_request_bytes=300_000, max_image_bytes=60_000, max_image_pixels=200 * 200,
              max_images=2, max_tokens_limit=64, default_max_tokens=2)  # fmt: skip


@pytest.fixture(scope="module")
def server(session):
    with serving(session, ServeConfig(model_name="tiny", api_key=KEY, **LIMITS)) as (url, _):
        yield url


def png_url(width: int, height: int, noise: bool = False, mime: str = "image/png") -> str:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    if noise:
        image = Image.frombytes("RGB", image.size, random.Random(0).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return f"data:{mime};base64," + base64.b64encode(out.getvalue()).decode()


def picture(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [
        picture(p) if p.startswith(("data:", "http", "file", "/")) else {"type": "text", "text": p}
        for p in parts]}]  # fmt: skip


SMALL = png_url(32, 32)
# (what is wrong, create() keyword arguments, status, param)
BAD_REQUESTS = [
    ("no messages", {"messages": []}, 400, "messages"),
    ("ends with the assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("a typed marker", {"messages": user("<image> what?")}, 400, "messages[0].content[0].text"),
    ("a remote URL", {"messages": user("http://example.com/a.png", "What?")}, 400,
     "messages[0].content[0].image_url.url"),
    ("a local file without the flag", {"messages": user("/etc/hostname", "What?")}, 400,
     "messages[0].content[0].image_url.url"),
    ("bad base64", {"messages": user("data:image/png;base64,@@@", "What?")}, 400,
     "messages[0].content[0].image_url.url"),
    ("not an image type", {"messages": user("data:text/plain;base64,aGk=", "What?")}, 400,
     "messages[0].content[0].image_url.url"),
    ("bytes that are no image", {"messages": user("data:image/png;base64,aGVsbG8=", "x")}, 400,
     "messages[0].content[0].image_url.url"),
    ("system after user", {"messages": [*user("hi"), {"role": "system", "content": "x"},
                                        *user("hi")]}, 400, "messages[1]"),
    ("image from the assistant", {"messages": [
        {"role": "assistant", "content": [picture(SMALL)]}, *user("hi")]}, 400, "messages[0]"),
    ("n=2", {"messages": user("hi"), "n": 2}, 400, "n"),
    ("temperature 3", {"messages": user("hi"), "temperature": 3}, 400, "temperature"),
    ("top_p 0", {"messages": user("hi"), "top_p": 0}, 400, "top_p"),
    ("max_tokens above the limit", {"messages": user("hi"), "max_tokens": 65}, 400, "max_tokens"),
    ("max_tokens a string", {"messages": user("hi"), "max_tokens": "9"}, 400, "max_tokens"),
    ("five stop strings", {"messages": user("hi"), "stop": list("abcde")}, 400, "stop"),
    ("tools", {"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("an unknown model", {"messages": user("hi"), "model": "gpt-4o"}, 404, "model"),
    ("a large body", {"messages": user("x" * 310_000)}, 413, None),
    ("too many images", {"messages": user(SMALL, SMALL, SMALL, "What?")}, 413, "messages"),
    ("too many pixels", {"messages": user(png_url(201, 200), "What?")}, 413,
     "messages[0].content[0].image_url.url"),
    ("too many bytes", {"messages": user(png_url(190, 190, noise=True), "What?")}, 413,
     "messages[0].content[0].image_url.url"),
]  # fmt: skip


def still_serving(url: str) -> None:
    reply = client_for(url).chat.completions.create(model="tiny", messages=user(SMALL, "Hi?"))
    assert reply.choices[0].message.content is not None
    assert httpx.get(f"{url}/health").status_code == 200


def assert_openai_error(error, status: int, param: str | None) -> None:
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["message"]
    assert error.body["param"] == param


@pytest.mark.parametrize(("wrong", "kwargs", "status", "param"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_a_bad_request_gets_its_status_and_the_server_goes_on(server, wrong, kwargs, status, param):
    kwargs = {"model": "tiny", **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).chat.completions.create(**kwargs)
    assert_openai_error(caught.value, status, param)
    still_serving(server)


def test_the_key_is_asked_for_except_by_health(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, key="wrong").chat.completions.create(model="tiny", messages=user("hi"))
    assert_openai_error(caught.value, 401, None)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, key="wrong").models.list()
    for path in ("/v1/models", "/v1/chat/completions"):  # no key at all
        response = httpx.request("POST" if "chat" in path else "GET", server + path, json={})
        assert response.status_code == 401 and response.json()["error"]["type"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    still_serving(server)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/models/gpt-4o", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
])  # fmt: skip
def test_raw_http_faults_are_openai_shaped(server, method, path, body, status):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.request(method, server + path, content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    still_serving(server)


class Gated:
    """The session, with a gate in front of `answer_batch`; a conversation saying "boom" fails."""

    def __init__(self, session: InferenceSession) -> None:
        self.session = session
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.session, name)

    def answer_batch(self, conversations, *args, **kwargs):
        self.entered.set()
        if any("boom" in text for _, contents in conversations for text in contents):
            raise RuntimeError("boom")
        assert self.gate.wait(30)
        return self.session.answer_batch(conversations, *args, **kwargs)


@pytest.fixture
def gated(session):
    gated = Gated(session)
    config = ServeConfig(model_name="tiny", queue_size=1, max_batch_size=1, batch_window_s=0,
                         request_timeout_s=3, default_max_tokens=2)  # fmt: skip
    with serving(gated, config) as (url, scheduler):
        yield gated, url, scheduler
    gated.gate.set()


def test_a_full_queue_is_503_and_the_queued_requests_are_answered(gated):
    session, url, scheduler = gated
    session.gate.clear()
    replies = []
    ask = lambda: replies.append(client_for(url).chat.completions.create(  # noqa: E731
        model="tiny", messages=user(SMALL, "What?")))  # fmt: skip
    first = threading.Thread(target=ask)
    first.start()
    assert session.entered.wait(10)
    second = threading.Thread(target=ask)
    second.start()
    deadline = time.monotonic() + 10
    while scheduler.waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(url).chat.completions.create(model="tiny", messages=user("hi"))
    assert_openai_error(caught.value, 503, None)
    assert caught.value.body["code"] == "queue_full"
    session.gate.set()
    first.join(10), second.join(10)
    assert len(replies) == 2
    still_serving(url)


def test_a_request_past_its_timeout_is_504_and_the_server_goes_on(gated):
    session, url, _ = gated
    session.gate.clear()
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(url).chat.completions.create(model="tiny", messages=user("hi"))
    assert_openai_error(caught.value, 504, None)
    assert 2.5 < time.monotonic() - start < 10
    session.gate.set()
    still_serving(url)


def test_a_failed_generation_is_500_for_its_request_only(gated):
    _, url, _ = gated
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(url).chat.completions.create(model="tiny", messages=user("boom"))
    assert_openai_error(caught.value, 500, None)
    assert "RuntimeError: boom" in caught.value.body["message"]
    still_serving(url)


def test_a_failed_batch_is_retried_one_request_at_a_time(session):
    """A batch holding one failing request: the others still get their answers."""
    scheduler = BatchScheduler(Gated(session), max_batch_size=4, batch_window_s=0.5).start()
    outcomes: dict[str, list] = {"boom": [], "fine": []}
    try:
        for name in outcomes:
            scheduler.submit(Job(["user"], [name], [], None, GenerationSettings(max_new_tokens=2),
                                 prompt_tokens=1, deadline=time.monotonic() + 30,
                                 notify=lambda kind, value, name=name: outcomes[name].append(
                                     (kind, value))))  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(o and o[-1][0] in ("done", "error") for o in outcomes.values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        scheduler.close()
    assert outcomes["boom"][-1][0] == "error" and outcomes["boom"][-1][1].status == 500
    assert outcomes["fine"][-1][0] == "done"
    assert outcomes["fine"][-1][1].text == session.answer(
        ["user"], ["fine"], [], GenerationSettings(max_new_tokens=2)
    )


def test_a_lone_client_waits_for_no_one_after_its_first_request(session):
    """The collection window is spent only while more requests were recently in the server."""
    scheduler = BatchScheduler(session, max_batch_size=8, batch_window_s=2.0).start()
    try:
        for first in (True, False, False):
            done = threading.Event()
            start = time.monotonic()
            scheduler.submit(Job(["user"], ["Hi"], [], None, GenerationSettings(max_new_tokens=1),
                                 prompt_tokens=1, deadline=start + 30,
                                 notify=lambda kind, value, done=done: done.set()))  # fmt: skip
            assert done.wait(30)
            waited = time.monotonic() - start
            assert waited >= 2.0 if first else waited < 1.0  # cold: it may have had company
    finally:
        scheduler.close()
