"""The one inference path: a conversation (with history) and its images -> the model's answer.

`InferenceSession` holds a loaded VLM, its tokenizer, the system prompt recorded at training time
and the generation settings. Its prompt is rendered by the processor that renders training
samples (`dataset.processor.VLMProcessor`, with the model's `image_processor`: the same
placeholder count per image size as in training), so the prompt for turn k is the training rendering of the
same history, token for token. `test.py`, evaluation and any application answer through it:
`answer` for one conversation, `answer_batch` for several in one left-padded `generate` call.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from dataprocess.schema import IMAGE_MARKER
from dataset.conversation import chat_stop_token_ids
from dataset.processor import ImageSizes, VLMProcessor, image_sizes_of
from model.checkpoint import load_vlm
from model.vlm import VisionLanguageModel
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT
from visual import load_image

logger = logging.getLogger(__name__)

CONTROL_TOKEN_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
ImageInput = Path | str | Image.Image  # a file, or an image already decoded (e.g. from a TSV)


@dataclass
class GenerationSettings:
    """How to decode; every field is also a flag of `test.py` (`--max_new_tokens 64`)."""

    max_new_tokens: int = 128
    do_sample: bool = False  # sample instead of greedy decoding
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        bounds = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in bounds.items():
            if not ok:
                raise ValueError(f"--{name} {getattr(self, name)!r} is out of range")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("generation")
        for f in dataclasses.fields(cls):
            if f.type in (bool, "bool"):
                group.add_argument(f"--{f.name}", action="store_true")
            else:
                kind = {"int": int, "float": float}.get(f.type, f.type)
                group.add_argument(f"--{f.name}", type=kind, default=f.default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerationSettings:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": chat_stop_token_ids(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "use_cache": True,  # a model config may say False (training); decoding needs the cache
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def check_system_prompt(system_prompt: str, flag: str = "--system_prompt") -> str:
    """A system prompt holds no image marker and no chat control tokens."""
    bad = [t for t in (IMAGE_MARKER, *CONTROL_TOKEN_TEXT) if t in system_prompt]
    if bad:
        raise ValueError(f"{flag} must not contain {', '.join(map(repr, bad))}")
    return system_prompt


class InferenceSession:
    """A loaded VLM ready to answer: `answer(roles, contents, images)`."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        tokenizer,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        settings: GenerationSettings | None = None,
    ) -> None:
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.system_prompt = check_system_prompt(system_prompt)
        self.settings = settings or GenerationSettings()
        self.processor = VLMProcessor(
            tokenizer, vlm.image_token_id, vlm.image_processor, system_prompt=self.system_prompt
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        system_prompt: str | None = None,
        settings: GenerationSettings | None = None,
        **load_kwargs,
    ) -> InferenceSession:
        """Load a training output / checkpoint / merged directory (`model.checkpoint.load_vlm`);
        the system prompt defaults to the one recorded at training time."""
        vlm, tokenizer, description = load_vlm(checkpoint, **load_kwargs)
        system = system_prompt or description.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
        return cls(vlm, tokenizer, system_prompt=system, settings=settings)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.projector.parameters()).device

    def prompt_ids(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        system_prompt: str | None = None,
        image_sizes: ImageSizes | None = None,
    ) -> list[int]:
        """The generation prompt for a conversation ending with a user turn (history included);
        `system_prompt` replaces the session's for this conversation (a record's own).
        `image_sizes` ((height, width) of the decoded images, in marker order) may be left out
        only when the model's image processor gives every image the same count."""
        return self.processor.prompt_ids(roles, contents, image_sizes, system_prompt)

    def answer(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        images: Sequence[ImageInput] = (),
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> str:
        """The assistant's reply to `contents` (user/assistant turns ending with a user turn);
        one `<image>` marker per image across the turns, in order."""
        return self.answer_batch([(roles, contents)], [images], settings, [system_prompt])[0]

    def stream(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        images: Sequence[ImageInput] = (),
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> Iterator[str]:
        """`answer`, in pieces as the tokens come; the pieces join to `answer`'s text.

        `answer_batch` runs in a thread with a streamer; its errors are raised here. Closing the
        iterator early (a web page's stop button) stops the generation at its next token.
        """
        streamer = _ReplyStreamer(self)
        outcome: list = []

        def run() -> None:
            try:
                replies = self.answer_batch(
                    [(roles, contents)], [images], settings, [system_prompt], streamer=streamer
                )
                outcome.append(replies[0])
            except BaseException as error:  # handed to the reader below
                outcome.append(error)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        sent = ""
        try:
            for text in streamer.texts():
                if text.startswith(sent) and len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
        finally:
            streamer.cancelled.set()
            thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        if outcome[0].startswith(sent) and len(outcome[0]) > len(sent):
            yield outcome[0][len(sent) :]

    @torch.no_grad()
    def answer_batch(
        self,
        conversations: Sequence[tuple[Sequence[str], Sequence[str]]],
        images_per_conversation: Sequence[Sequence[ImageInput]],
        settings: GenerationSettings | None = None,
        system_prompts: Sequence[str | None] | None = None,
        *,
        streamer: BaseStreamer | None = None,
    ) -> list[str]:
        """Replies to several conversations (`(roles, contents)` each) in one `generate` call.

        Prompts are left-padded to one length with an attention mask, so every row's next token
        sits in the last column; QWen and transformers' `generate` take each row's positions from
        the mask (cumulative sum), so greedy replies equal one-at-a-time replies. Images are files
        or PIL images; their feature rows are spliced in row-major order (batch, then turn).
        `streamer` receives the new ids as they come (`stream` passes one).
        """
        if len(images_per_conversation) != len(conversations):
            raise ValueError(
                f"{len(conversations)} conversations but {len(images_per_conversation)} image lists"
            )
        systems = system_prompts or [None] * len(conversations)
        prompts, pictures = [], []
        for index, ((roles, contents), images) in enumerate(
            zip(conversations, images_per_conversation, strict=True)
        ):
            markers = sum(content.count(IMAGE_MARKER) for content in contents)
            if markers != len(images):
                where = f"conversation {index}: " if len(conversations) > 1 else ""
                raise ValueError(
                    f"{where}the conversation has {markers} {IMAGE_MARKER} marker(s) but "
                    f"{len(images)} image(s) were given; put one marker per image"
                )
            decoded = [load_image(image) for image in images]
            sizes = image_sizes_of(decoded)  # [n_img, 2]
            prompts.append(self.prompt_ids(roles, contents, systems[index], sizes))
            pictures.extend(decoded)
        settings = settings or self.settings
        input_ids, attention_mask = self.left_padded(prompts)  # [B, T] each
        image_inputs = {}
        if pictures:
            image_inputs = {  # pixel_values [n_img, 3, H, W] (or all tiles), image_sizes [n_img, 2]
                key: value.to(self.device)
                for key, value in self.processor.image_inputs(pictures).items()
            }
        new_ids = self.vlm.generate(
            input_ids,
            attention_mask=attention_mask,
            **image_inputs,
            **settings.generate_kwargs(self.tokenizer),
            streamer=streamer,
        )  # [B, new]
        stops = set(chat_stop_token_ids(self.tokenizer))
        return [self._decode(row, stops) for row in new_ids.tolist()]

    def left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `attention_mask` `[B, T]`, padding on the left (1 = real token)."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def reply_text(self, new_ids: Sequence[int], stops: set[int] | None = None) -> str:
        """The reply that generated ids make, decoded as `answer` decodes it (up to the first
        stop id); `stops` may pass `chat_stop_token_ids` computed once."""
        return self._decode(list(new_ids), stops or set(chat_stop_token_ids(self.tokenizer)))

    def _decode(self, ids: list[int], stops: set[int]) -> str:
        """Text up to the first stop id: a finished row is filled with padding after it."""
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


class _StreamCancelled(Exception):
    """Raised inside `generate` (from the streamer) when the reader of `stream` has gone."""


class _ReplyStreamer(BaseStreamer):
    """Collects the new ids of a one-row `generate` and hands out the reply decoded so far,
    decoded as `answer` decodes it; a text cut inside a multi-byte character waits."""

    def __init__(self, session: InferenceSession) -> None:
        self.session = session
        self.stops = set(chat_stop_token_ids(session.tokenizer))
        self.ids: list[int] = []
        self.prompt_seen = False
        self.cancelled = threading.Event()
        self.queue: queue.Queue[str | None] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise _StreamCancelled
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.session._decode(self.ids, self.stops)
        if not text.endswith("\ufffd"):
            self.queue.put(text)

    def end(self) -> None:
        self.queue.put(None)

    def texts(self) -> Iterator[str]:
        while (text := self.queue.get()) is not None:
            yield text
