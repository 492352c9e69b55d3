"""The batching scheduler: requests that arrive together are answered by one left-padded
`InferenceSession.answer_batch` call, on one worker thread that owns the model.

A batch waits at most the collection window (`--batch_window_ms`) for others to join it (see
`_next_batch`: only while more requests than are waiting were recently in the server). A batch holds up to
`--max_batch_size` requests with the same decoding settings (greedy requests with different
`max_tokens` share a batch: each row stops at its own limit, and greedy rows do not depend on
each other, so every answer equals the one-at-a-time answer). A seeded sampling request runs
alone, so its seed alone decides its tokens. The new ids reach each request through one streamer
as they are generated (streamed deltas, stop strings, token counts, timeouts); once every row is
finished, generation stops. A failed batch is retried one request at a time, so one bad request
fails alone; no failure stops the worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from dataset.conversation import chat_stop_token_ids
from runtime.inference import GenerationSettings, InferenceSession
from runtime.serve.errors import ApiError

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"


@dataclass(eq=False)
class Job:
    """One request's conversation; `notify(kind, value)` gets ("delta", text) while streaming,
    then ("done", Completion) or ("error", ApiError), from the worker thread."""

    roles: list[str]
    contents: list[str]
    images: list[Image.Image]
    system_prompt: str | None
    settings: GenerationSettings
    prompt_tokens: int
    notify: Callable[[str, object], None]
    deadline: float  # time.monotonic() by which the answer must be complete
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        shared = dataclasses.astuple(dataclasses.replace(self.settings, max_new_tokens=1))
        alone = id(self) if self.settings.do_sample and self.seed is not None else None
        return (*shared, alone)

    def expired(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class BatchScheduler:
    """Queues jobs (`submit`) and answers them in batches on one worker thread (`start`)."""

    def __init__(
        self,
        session: InferenceSession,
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        queue_size: int = 64,
    ) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.queue_size = queue_size
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> batches run
        self._waiting: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._running = 0  # jobs in the batch being generated
        self._peak = max_batch_size  # most jobs held at once since the last batch began
        self._stops = set(chat_stop_token_ids(session.tokenizer))
        self._thread = threading.Thread(target=self._work, name="serve-batches", daemon=True)

    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job; `ApiError` 503 when `queue_size` jobs already wait."""
        with self._condition:
            if len(self._waiting) >= self.queue_size:
                raise ApiError(503, f"the server is busy: {self.queue_size} requests are waiting "
                               "(--queue_size); retry later", code="queue_full")  # fmt: skip
            self._waiting.append(job)
            self._peak = max(self._peak, self._running + len(self._waiting))
            self._condition.notify()

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the waiting jobs that may share its batch.

        It waits, at most the collection window from when the worker is free (or the job
        arrived), for as many jobs as the server held at once during the last batch: clients
        whose answers just went out are about to ask again, and waiting for them keeps one full
        batch instead of two half ones taking turns. A lone client never waits.
        """
        with self._condition:
            self._running = 0
            free = time.monotonic()
            while not self._waiting and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            until = max(free, self._waiting[0].arrived) + self.batch_window_s
            target = min(self.max_batch_size, self._peak)
            while len(self._waiting) < target and (left := until - time.monotonic()) > 0:
                self._condition.wait(left)
            key = self._waiting[0].key()
            batch = [job for job in self._waiting if job.key() == key][: self.max_batch_size]
            for job in batch:
                self._waiting.remove(job)
            self._running = len(batch)
            self._peak = self._running + len(self._waiting)
        live = [job for job in batch if not job.expired()]
        for job in batch:
            if job.expired():
                job.notify("error", timed_out())
        return live

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._serve(batch)

    def _serve(self, jobs: list[Job]) -> None:
        rows = [_Row(job, self.session, self._stops) for job in jobs]
        try:
            self._generate(rows)
        except Exception as error:  # never lets the worker die; one bad request fails alone
            if len(jobs) > 1:
                logger.warning(
                    "a batch of %d failed (%s); answering one at a time", len(jobs), error
                )
                for row in rows:
                    if row.sent:  # its client already has part of an answer
                        row.job.notify("error", generation_failed(error))
                    else:
                        self._serve([row.job])
                return
            logger.exception("generation failed")
            jobs[0].notify("error", generation_failed(error))
            return
        self.batch_sizes[len(jobs)] += 1
        for row in rows:
            row.finish()

    def _generate(self, rows: list[_Row]) -> None:
        jobs = [row.job for row in rows]
        longest = max(job.settings.max_new_tokens for job in jobs)
        settings = dataclasses.replace(jobs[0].settings, max_new_tokens=longest)
        if settings.do_sample and jobs[0].seed is not None:  # a seeded request runs alone
            torch.manual_seed(jobs[0].seed)
        # _BatchDone: every row had its answer before the longest limit
        with contextlib.suppress(_BatchDone):
            self.session.answer_batch(
                [(job.roles, job.contents) for job in jobs],
                [job.images for job in jobs],
                settings,
                [job.system_prompt for job in jobs],
                streamer=_BatchStreamer(rows),
            )


class _BatchDone(Exception):
    """Raised inside `generate` by the streamer when no row needs more tokens."""


class _BatchStreamer(BaseStreamer):
    """Hands each step's new ids (one per row) to the rows; stops `generate` when all are done."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for row, tokens in zip(self.rows, value.reshape(len(self.rows), -1).tolist(), strict=True):
            for token in tokens:
                row.add(token)
        if all(row.done() for row in self.rows):
            raise _BatchDone

    def end(self) -> None:
        pass


class _Row:
    """One request's answer as its ids arrive: its own token limit, stop strings and deltas."""

    def __init__(self, job: Job, session: InferenceSession, stops: set[int]) -> None:
        self.job, self.session, self.stops = job, session, stops
        self.ids: list[int] = []
        self.sent = ""  # the text streamed so far
        self.finish_reason: str | None = None

    def done(self) -> bool:
        return self.finish_reason is not None or self.job.expired()

    def add(self, token: int) -> None:
        if self.done():
            return
        if token in self.stops:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        if len(self.ids) >= self.job.settings.max_new_tokens:
            self.finish_reason = "length"
        if self.job.stream or self.job.stop:
            self._advance()

    def _advance(self) -> None:
        text, stopped = cut_at_stop(self.session.reply_text(self.ids, self.stops), self.job.stop)
        if stopped:
            self.finish_reason = "stop"
        else:
            text = held_back(text, self.job.stop)
        if self.job.stream and text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.notify("delta", text[len(self.sent) :])
            self.sent = text

    def finish(self) -> None:
        if self.finish_reason is None and self.job.expired():  # cut off, not finished
            self.job.notify("error", timed_out())
            return
        text, stopped = cut_at_stop(self.session.reply_text(self.ids, self.stops), self.job.stop)
        if self.job.stream and text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.notify("delta", text[len(self.sent) :])
        reason = "stop" if stopped else self.finish_reason or "length"
        self.job.notify("done", Completion(text, self.job.prompt_tokens, len(self.ids), reason))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one occurred."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return (text[: min(found)], True) if found else (text, False)


def held_back(text: str, stops: list[str]) -> str:
    """`text` less what may still become a stop string or a whole character: not yet sent."""
    text = text.rstrip("\ufffd")  # a character cut between tokens
    keep = len(text)
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = min(keep, len(text) - size)
                break
    return text[:keep]


def timed_out() -> ApiError:
    return ApiError(504, "the request took longer than the server's --request_timeout",
                    code="timeout")  # fmt: skip


def generation_failed(error: Exception) -> ApiError:
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}",
                    code="generation_failed")  # fmt: skip
