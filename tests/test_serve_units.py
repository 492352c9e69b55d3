"""The API server's parts without a model: a request's messages become the web chat's layout,
stop strings are held back while streaming, and bad flags are refused before anything loads."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (requirements-web.txt)")
from runtime.inference import GenerationSettings  # noqa: E402
from runtime.serve.__main__ import main, parse_args, serve_config  # noqa: E402
from runtime.serve.config import ServeConfig  # noqa: E402
from runtime.serve.errors import ApiError  # noqa: E402
from runtime.serve.messages import parse_chat_request  # noqa: E402
from runtime.serve.scheduler import cut_at_stop, held_back  # noqa: E402
from runtime.web.chat import session_inputs  # noqa: E402

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def parse(messages: list[dict], **fields):
    body = {"model": "vlm", "messages": messages, **fields}
    return parse_chat_request(body, ServeConfig(), GenerationSettings())


def test_parts_are_laid_out_as_the_web_chat_lays_out_its_turns():
    question = {"type": "text", "text": "What shape is it?"}
    chat = parse([{"role": "user", "content": [IMAGE, IMAGE, question]},
                  {"role": "assistant", "content": "a circle"},
                  {"role": "user", "content": "And its colour?"}])  # fmt: skip
    web = session_inputs([
        {"role": "user", "text": "What shape is it?", "images": ["a.png", "b.png"]},
        {"role": "assistant", "text": "a circle"},
        {"role": "user", "text": "And its colour?", "images": []},
    ])  # fmt: skip
    assert (chat.roles, chat.contents) == (web[0], web[1])
    assert [field for _, field in chat.image_urls] == [
        "messages[0].content[0].image_url.url", "messages[0].content[1].image_url.url"]  # fmt: skip


def test_system_messages_and_settings():
    chat = parse([{"role": "system", "content": "Be brief."},
                  {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                  {"role": "user", "content": "Hi"}], temperature=0, max_tokens=5,
                 stop="x", stream=True, stream_options={"include_usage": True})  # fmt: skip
    assert chat.system_prompt == "Be brief.\nBe kind." and chat.roles == ["user"]
    assert not chat.settings.do_sample and chat.settings.max_new_tokens == 5
    assert chat.stop == ["x"] and chat.stream and chat.include_usage
    assert parse([{"role": "user", "content": "Hi"}]).settings.max_new_tokens == 128
    sampled = parse([{"role": "user", "content": "Hi"}], temperature=0.7, top_p=0.9, seed=3)
    assert sampled.settings.do_sample and sampled.settings.temperature == 0.7 and sampled.seed == 3


def test_a_system_prompt_with_control_tokens_is_refused():
    with pytest.raises(ApiError) as caught:
        parse([{"role": "system", "content": "<|im_end|>"}, {"role": "user", "content": "Hi"}])
    assert caught.value.status == 400 and caught.value.param == "messages[0].content"


@pytest.mark.parametrize(("text", "stops", "shown"), [
    ("Hello wor", ["world"], "Hello "),  # may still become the stop string
    ("Hello wax", ["world"], "Hello wax"),
    ("caf\ufffd", [], "caf"),  # half a character
    ("abc", [], "abc"),
])  # fmt: skip
def test_streaming_holds_back_what_may_become_a_stop_string(text, stops, shown):
    assert held_back(text, stops) == shown


def test_the_answer_is_cut_at_the_first_stop_string():
    assert cut_at_stop("one. two! three", [" three", "!"]) == ("one. two", True)
    assert cut_at_stop("one", ["x"]) == ("one", False)


def test_safe_defaults(monkeypatch):
    monkeypatch.delenv("VLM_API_KEY", raising=False)
    args = parse_args([])
    config = serve_config(args)
    assert args.host == "127.0.0.1" and config.api_key is None
    monkeypatch.setenv("VLM_API_KEY", "from-env")
    assert serve_config(parse_args([])).api_key == "from-env"
    assert config.allowed_local_media_path is None and config.max_batch_size == 8
    assert serve_config(parse_args(["--no_batching"])).max_batch_size == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--queue_size", "0"], "--queue_size"),
    (["--max_image_mb", "0"], "--max_image_mb"),
    (["--max_new_tokens", "2000"], "--max_tokens_limit"),
    (["--allowed_local_media_path", "/no/such/dir"], "--allowed_local_media_path"),
    (["--api_key", " "], "--api_key"),
])  # fmt: skip
def test_bad_flags_are_refused_before_the_model_loads(flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(["--model_weights", "/no/such/checkpoint", *flags])
