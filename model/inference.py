"""Answering questions about images with a trained VLM, and exact-match evaluation.

The prompt is rendered by the same code that renders training samples (`dataset.conversation`),
so the token layout at inference is the training layout by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataprocess.schema import IMAGE_MARKER
from dataset.conversation import DEFAULT_SYSTEM_PROMPT, encode_prompt
from model.vlm import VisionLanguageModel
from qwen.chat_format import chat_stop_ids
from visual import load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

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


@torch.no_grad()
def answer(
    vlm: VisionLanguageModel,
    tokenizer,
    roles: Sequence[str],
    contents: Sequence[str],
    images: Sequence[Path] = (),
    settings: GenerationSettings | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Generate the assistant's reply to a conversation ending with a user turn."""
    settings = settings or GenerationSettings()
    prompt_ids = encode_prompt(
        tokenizer,
        roles,
        contents,
        image_token_id=vlm.image_token_id,
        num_image_tokens=vlm.num_image_tokens,
        system_prompt=system_prompt,
    )
    device = next(vlm.projector.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)  # [1, T]
    pixel_values = None
    if images:
        pixel_values = vlm.vision.preprocess([load_image(p) for p in images]).to(device)
    new_ids = vlm.generate(
        input_ids, pixel_values=pixel_values, **settings.generate_kwargs(tokenizer)
    )  # [1, new]
    return tokenizer.decode(new_ids[0].tolist(), skip_special_tokens=True).strip()


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".。!！").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)
