"""The HTTP routes: `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`,
`GET /health` (no key). Every error is OpenAI-shaped (`errors.ApiError`); a failed generation
becomes a 500 for its request only.

A request is read (size-limited), parsed (`messages.py`), its images decoded (`media.py`) and its
prompt measured off the event loop, then queued on the `BatchScheduler`, whose worker thread
answers it; its tokens come back through a mailbox on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dataset.processor import image_sizes_of
from runtime.inference import InferenceSession
from runtime.serve.config import ServeConfig
from runtime.serve.errors import ApiError, bad_request, too_large
from runtime.serve.media import fetch_image
from runtime.serve.messages import ChatRequest, parse_chat_request
from runtime.serve.scheduler import BatchScheduler, Completion, Job, timed_out

logger = logging.getLogger(__name__)


class Mailbox:
    """What the worker thread tells one request, delivered on the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def notify(self, kind: str, value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def next(self, job: Job) -> tuple[str, object]:
        try:
            return await asyncio.wait_for(self.queue.get(), max(job.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
            raise timed_out() from None


def build_app(session: InferenceSession, config: ServeConfig, scheduler: BatchScheduler) -> FastAPI:
    """The application for one loaded session; the scheduler starts and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="Qwen VLM API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip

    add_error_handlers(app)

    @app.get("/health")
    async def health():
        batches = dict(sorted(scheduler.batch_sizes.items()))  # size -> batches answered
        return {"status": "ok", "waiting": scheduler.waiting, "batch_sizes": batches}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, config)
        return {"object": "list", "data": [model_card(config)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        check_key(request, config)
        if model_id != config.model_name:
            raise ApiError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")  # fmt: skip
        return model_card(config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer_chat(request, session, config, scheduler)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, Starlette's (unknown routes, wrong methods), and any
    other exception as a 500 that names only its type."""

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)  # fmt: skip

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):
        logger.exception("request failed")
        body = ApiError(500, f"internal error: {type(error).__name__}").body()
        return JSONResponse(body, status_code=500)


async def answer_chat(request: Request, session, config: ServeConfig, scheduler: BatchScheduler):
    """`POST /v1/chat/completions`: checked, queued, answered as JSON or as events."""
    check_key(request, config)
    body = await read_json(request, config.max_request_bytes)
    chat = parse_chat_request(body, config, session.settings)
    mailbox = Mailbox()
    job = await run_in_threadpool(prepare_job, session, chat, config, mailbox.notify)
    scheduler.submit(job)
    answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if chat.stream:
        events = stream_events(mailbox, job, chat, answer_id, created)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        while True:
            kind, value = await mailbox.next(job)
            if kind == "error":
                raise value
            if kind == "done":
                return completion_body(value, chat.model, answer_id, created)
    finally:
        job.cancelled.set()  # a client that left, a timeout: the worker skips its row


def check_key(request: Request, config: ServeConfig) -> None:
    if config.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), config.api_key):
        raise ApiError(401, "missing or wrong API key: send the header "
                       "'Authorization: Bearer <key>'", code="invalid_api_key")  # fmt: skip


async def read_json(request: Request, limit: int) -> object:
    """The JSON body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"the request body is {int(declared):,} bytes; the limit is {limit:,} "
                        "(--max_request_mb)")  # fmt: skip
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large(f"the request body is over {limit:,} bytes (--max_request_mb)")
    try:
        return json.loads(data)
    except ValueError as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None


def prepare_job(session: InferenceSession, chat: ChatRequest, config: ServeConfig, notify) -> Job:
    """Decode the images and measure the prompt (off the event loop)."""
    images = [fetch_image(url, where, config) for url, where in chat.image_urls]
    try:
        sizes = image_sizes_of(images)  # the count of image tokens may depend on the size
        prompt = session.prompt_ids(chat.roles, chat.contents, chat.system_prompt, sizes)
    except ValueError as error:
        raise bad_request(str(error), "messages") from None
    return Job(
        roles=chat.roles,
        contents=chat.contents,
        images=images,
        system_prompt=chat.system_prompt,
        settings=chat.settings,
        prompt_tokens=len(prompt),
        notify=notify,
        deadline=time.monotonic() + config.request_timeout_s,
        stop=chat.stop,
        seed=chat.seed,
        stream=chat.stream,
    )


async def stream_events(mailbox: Mailbox, job: Job, chat: ChatRequest, answer_id: str, created):
    """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`."""

    def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        body = {"id": answer_id, "object": "chat.completion.chunk", "created": created,
                "model": chat.model, "choices": choices}  # fmt: skip
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await mailbox.next(job)
            except ApiError as error:
                kind, value = "error", error
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value.finish_reason)
                if chat.include_usage:
                    yield chunk({}, usage=usage_of(value))
                break
            else:  # the status line has gone out: the error travels as an event
                yield f"data: {json.dumps(value.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def usage_of(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def completion_body(completion: Completion, model: str, answer_id: str, created: int) -> dict:
    message = {"role": "assistant", "content": completion.text}
    return {
        "id": answer_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],  # fmt: skip
        "usage": usage_of(completion),
    }


def model_card(config: ServeConfig) -> dict:
    return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "local"}
