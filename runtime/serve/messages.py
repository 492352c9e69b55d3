"""An OpenAI chat-completions request body -> the session's conversation and generation settings.

A message's parts become one content string in order, each image part as the `<image>` marker,
the parts joined by newlines: an image followed by a question is `<image>\\nquestion`, exactly
as the web chat and `test.py` lay it out, so the same question gives the same prompt tokens. The
prompt itself is rendered only by `InferenceSession.prompt_ids`. Leading system (or developer)
messages replace the session's system prompt. Faults are `ApiError`s naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataprocess.schema import IMAGE_MARKER
from runtime.inference import GenerationSettings, check_system_prompt
from runtime.serve.config import ServeConfig
from runtime.serve.errors import ApiError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4  # as OpenAI
TEMPERATURE_RANGE = (0.0, 2.0)  # 0 = greedy decoding
REFUSED_FIELDS = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs")
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", dict: "an object"}


@dataclass
class ChatRequest:
    """A parsed request: the conversation (ending with a user turn) and how to answer it."""

    model: str
    roles: list[str]
    contents: list[str]
    image_urls: list[tuple[str, str]]  # (url, the field that holds it), in prompt order
    system_prompt: str | None
    settings: GenerationSettings
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: object, config: ServeConfig, base: GenerationSettings) -> ChatRequest:
    """Check a decoded JSON body and translate it; `base` supplies top_k and repetition_penalty."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("a model name is required", "model")
    if model != config.model_name:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves "
                       f"{config.model_name!r}", param="model", code="model_not_found")  # fmt: skip
    for name in REFUSED_FIELDS:
        if body.get(name):
            raise bad_request("is not supported by this server", name)
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported", "n")
    roles, contents, image_urls, system = conversation(body.get("messages"), config)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {}) or {}
    return ChatRequest(
        model=model,
        roles=roles,
        contents=contents,
        image_urls=image_urls,
        system_prompt=system,
        settings=settings(body, config, base),
        stop=stop_strings(body.get("stop")),
        seed=_typed(body, "seed", int, None),
        stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
    )


def conversation(messages: object, config: ServeConfig):
    """(roles, contents, image urls with their fields, system prompt or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("must be a non-empty list of messages", "messages")
    roles, contents, image_urls, system = [], [], [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request("must be an object with a role and a content", where)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad_request(f"role {message.get('role')!r} is not one of "
                              f"{', '.join(ROLES)}", f"{where}.role")  # fmt: skip
        text, urls = message_content(message.get("content"), f"{where}.content")
        if urls and role != "user":
            raise bad_request(f"only user messages may hold images, not {role}", where)
        if role == "system":
            if roles:
                raise bad_request("system messages must come before the conversation", where)
            system.append(_checked(check_system_prompt, text, f"{where}.content"))
            continue
        roles.append(role)
        contents.append(text)
        image_urls += urls
    if not roles or roles[-1] != "user":
        raise bad_request("the last message must be a user message", "messages")
    if len(image_urls) > config.max_images:
        raise ApiError(413, f"the request holds {len(image_urls)} images; the limit is "
                       f"{config.max_images} (--max_images)", param="messages",
                       code="request_too_large")  # fmt: skip
    return roles, contents, image_urls, "\n".join(system) or None


def message_content(content: object, where: str) -> tuple[str, list[tuple[str, str]]]:
    """A message's content (a string or a list of text / image_url parts) as text with one
    `<image>` marker per image part, and the image urls with their fields."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return _no_marker(content, where), []
    if not isinstance(content, list):
        raise bad_request("must be a string or a list of content parts", where)
    pieces, urls = [], []
    for index, part in enumerate(content):
        field_name = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(_no_marker(part["text"], f"{field_name}.text"))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request("image_url.url must be a non-empty string", field_name)
            pieces.append(IMAGE_MARKER)
            urls.append((url, f"{field_name}.image_url.url"))
        else:
            raise bad_request("a content part must be {type: text, text} or "
                              "{type: image_url, image_url: {url}}", field_name)  # fmt: skip
    return "\n".join(pieces), urls


def settings(body: dict, config: ServeConfig, base: GenerationSettings) -> GenerationSettings:
    """max_tokens / max_completion_tokens, temperature (0 or absent: greedy) and top_p."""
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _typed(body, name, int, None)
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise bad_request(f"must be 1..{config.max_tokens_limit} (--max_tokens_limit), "
                          f"got {max_tokens}", name)  # fmt: skip
    temperature = _typed(body, "temperature", float, None) or 0.0
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise bad_request(f"must be {low:g}..{high:g}, got {temperature}", "temperature")
    top_p = _typed(body, "top_p", float, None)
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"must be in (0, 1], got {top_p}", "top_p")
    sample = temperature > 0
    return GenerationSettings(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_p=top_p,
        top_k=base.top_k,
        repetition_penalty=base.repetition_penalty,
    )


def stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):  # fmt: skip
        raise bad_request(f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS}",
                          "stop")  # fmt: skip
    return stops


def _typed(body: dict, name: str, kind: type, default):
    """`body[name]` if it has type `kind` (an int is a float; a bool is no number), else 400."""
    value = body.get(name)
    if value is None:
        return default
    numbers = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, numbers):
        raise bad_request(f"must be {TYPE_NAMES[kind]}", name)
    return float(value) if kind is float else value


def _no_marker(text: str, where: str) -> str:
    if IMAGE_MARKER in text:
        raise bad_request(f"remove {IMAGE_MARKER} from the text; send images as image_url "
                          "parts", where)  # fmt: skip
    return text


def _checked(check, text: str, where: str) -> str:
    try:
        return check(text, flag=where)
    except ValueError as error:
        raise ApiError(400, str(error), param=where) from None
