"""The one inference path: a conversation (with history) and its images -> the model's answer.

`InferenceSession` holds a loaded VLM, its tokenizer, the system prompt recorded at training time
and the generation settings. Its prompt is rendered by the code that renders training samples
(`dataset.conversation.encode_prompt`), so the prompt for turn k is the training rendering of the
same history, token for token. `test.py`, evaluation and any application answer through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataprocess.schema import IMAGE_MARKER
from dataset.conversation import encode_prompt
from model.checkpoint import load_vlm
from model.vlm import VisionLanguageModel
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT, chat_stop_ids
from visual import load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
CONTROL_TOKEN_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


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
            "eos_token_id": chat_stop_ids(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
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
        self, roles: Sequence[str], contents: Sequence[str], system_prompt: str | None = None
    ) -> list[int]:
        """The generation prompt for a conversation ending with a user turn (history included);
        `system_prompt` replaces the session's for this conversation (a record's own)."""
        return encode_prompt(
            self.tokenizer,
            roles,
            contents,
            image_token_id=self.vlm.image_token_id,
            num_image_tokens=self.vlm.num_image_tokens,
            system_prompt=system_prompt or self.system_prompt,
        )

    @torch.no_grad()
    def answer(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        images: Sequence[Path | str] = (),
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> str:
        """The assistant's reply to `contents` (user/assistant turns ending with a user turn);
        one `<image>` marker per image across the turns, in order."""
        markers = sum(content.count(IMAGE_MARKER) for content in contents)
        if markers != len(images):
            raise ValueError(
                f"the conversation has {markers} {IMAGE_MARKER} marker(s) but {len(images)} "
                "image(s) were given; put one marker per image"
            )
        settings = settings or self.settings
        prompt = self.prompt_ids(roles, contents, system_prompt)
        input_ids = torch.tensor([prompt], device=self.device)  # [1, T]
        pixel_values = None
        if images:
            pixel_values = self.vlm.vision.preprocess([load_image(p) for p in images])
            pixel_values = pixel_values.to(self.device)  # [n_img, 3, H, W]
        new_ids = self.vlm.generate(
            input_ids, pixel_values=pixel_values, **settings.generate_kwargs(self.tokenizer)
        )  # [1, new]
        return self.tokenizer.decode(new_ids[0].tolist(), skip_special_tokens=True).strip()


def image_files(path: str | Path) -> list[Path]:
    """A file, or every image file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--image_path {path}: the folder holds no image files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--image_path {path}: no such file or folder")
    return [path]


def with_image_marker(prompt: str, num_images: int) -> str:
    """Put one `<image>` marker per image in front of a prompt that has none."""
    if num_images and IMAGE_MARKER not in prompt:
        return "".join(f"{IMAGE_MARKER}\n" for _ in range(num_images)) + prompt
    return prompt


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".。!！").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)
