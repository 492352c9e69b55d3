"""The API server (`python -m runtime.serve`) driven by the official `openai` client.

A tiny random checkpoint is served in-process on a free 127.0.0.1 port. Its answers to held-out
shapes questions equal test.py's; streamed chunks join to the plain answer; multi-turn and
multi-image requests answer as the session does; concurrent requests share a batch and still get
their one-at-a-time answers. The error cases (their status and OpenAI error shape, the server
still serving after each) are in tests/test_serve_errors.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.inference import GenerationSettings, InferenceSession

openai = pytest.importorskip("openai", reason="openai is not installed (requirements.txt)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (requirements-web.txt)")
from conftest import answer_of_test_py, held_out  # noqa: E402
from conftest import save_tiny_checkpoint as save_checkpoint  # noqa: E402
from serve_helpers import (  # noqa: E402
    KEY,
    MAX_NEW_TOKENS,
    client_for,
    image_part,
    question,
    serving,
)

from runtime.serve.config import ServeConfig  # noqa: E402 - needs fastapi

pytestmark = pytest.mark.slow  # a model and a server per module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("serve-ckpt"), tiny_qwen_dir, tiny_clip_dir)


@pytest.fixture(scope="module")
def session(checkpoint) -> InferenceSession:
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    return InferenceSession.from_checkpoint(checkpoint, dtype="float32", settings=settings)


@pytest.fixture(scope="module")
def server(session, shapes_dir):
    config = ServeConfig(model_name="tiny", api_key=KEY, default_max_tokens=MAX_NEW_TOKENS,
                         batch_window_s=0.2, allowed_local_media_path=shapes_dir)  # fmt: skip
    with serving(session, config) as (url, scheduler):
        yield url, scheduler


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server[0])


def ask(client, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


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


@pytest.mark.parametrize("url", ["/etc/hostname", "file:///etc/hostname", "../outside.png"])
def test_local_files_outside_the_allowed_folder_are_refused(client, shapes_dir, url):
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}])
    assert "--allowed_local_media_path" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages[0].content[0].image_url.url"


def test_the_throughput_benchmark_runs_the_command_line_server(checkpoint, shapes_dir):
    """`python -m runtime.serve` in its own process, as the benchmark starts it."""
    from bench import serve_throughput

    rows = serve_throughput.main(["--model_weights", str(checkpoint), "--shapes", str(shapes_dir),
                                  "--clients", "1", "2", "--requests", "4", "--rounds", "1",
                                  "--max_tokens", "2", "--modes", "batching",
                                  "--server_flags", "--dtype", "float32"])  # fmt: skip
    assert [(row["mode"], row["clients"]) for row in rows] == [("batching", 1), ("batching", 2)]
    assert all(row["same_answers"] and row["requests_per_s"] > 0 for row in rows)
