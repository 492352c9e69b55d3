"""The web chat's conversation, without the web: turns -> the session's (roles, contents, images),
uploads checked, generation settings bounded, an answer's boxes drawn on the latest image.

A turn is `{"role": "user" | "assistant", "text": str, "images": [paths]}` (assistant turns have
no images). A user turn's images become `<image>` markers in front of its text, in order, as in
the training data; the prompt itself is rendered only by `InferenceSession.prompt_ids`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dataprocess.boxes import box_legend, draw_answer_boxes
from dataprocess.schema import IMAGE_MARKER
from runtime.inference import GenerationSettings
from visual import ImageLoadError, load_image

MAX_NEW_TOKENS = 1024  # the slider's top; a request above it is refused
TEMPERATURE_RANGE = (0.0, 2.0)  # 0 = greedy decoding
TOP_P_RANGE = (0.05, 1.0)
MAX_IMAGE_PIXELS = 40_000_000  # a small file can still decode huge (a "decompression bomb")


class ChatInputError(ValueError):
    """A request the user can fix (bad upload, empty question, settings out of range)."""


def user_turn(text: str, images: list[str], refused: list[str] = ()) -> dict:
    """A new user turn; refuses an empty question, a typed `<image>` marker, and a question
    asked right after the browser refused some of its files (`refused`: their names and why)."""
    if refused:
        raise ChatInputError(
            f"Not sent: {', '.join(refused)} could not be attached. Attach an image that fits, "
            "or send the question again to ask without it."
        )
    text = (text or "").strip()
    if not text:
        raise ChatInputError("Type a question (images alone are not a question).")
    if IMAGE_MARKER in text:
        raise ChatInputError(f"Remove {IMAGE_MARKER} from the text; attach images with the clip.")
    return {"role": "user", "text": text, "images": list(images)}


def checked_images(paths: list[str]) -> list[str]:
    """The uploaded files, each decoded once so that a non-image is refused with its name; the
    size is read from the header first, so an image too large to decode is refused unopened."""
    for path in paths:
        name = Path(path).name
        try:
            with Image.open(path) as header:
                width, height = header.size
        except (OSError, ValueError, Image.DecompressionBombError):  # load_image says why
            width = height = 0
        if width * height > MAX_IMAGE_PIXELS:
            raise ChatInputError(
                f"{name} is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,}."
            )
        try:
            load_image(path)
        except ImageLoadError:  # its message names the server's upload path: not for the page
            raise ChatInputError(f"{name} is not an image that can be read.") from None
    return list(paths)


def session_inputs(turns: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """(roles, contents, images) of a conversation ending with a user turn."""
    roles, contents, images = [], [], []
    for turn in turns:
        pictures = turn.get("images", [])
        roles.append(turn["role"])
        contents.append(f"{IMAGE_MARKER}\n" * len(pictures) + turn["text"])
        images.extend(pictures)
    return roles, contents, images


def settings_from(
    base: GenerationSettings, max_new_tokens: float, temperature: float, top_p: float
) -> GenerationSettings:
    """The page's settings on top of the session's; temperature 0 means greedy decoding."""
    checks = {
        f"max new tokens must be 1..{MAX_NEW_TOKENS}": 1 <= max_new_tokens <= MAX_NEW_TOKENS,
        "temperature must be 0..2": TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1],
        "top-p must be 0.05..1": TOP_P_RANGE[0] <= top_p <= TOP_P_RANGE[1],
    }
    bad = [message for message, ok in checks.items() if not ok]
    if bad:
        raise ChatInputError("; ".join(bad))
    sample = temperature > 0
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_p=top_p,
        top_k=base.top_k,
        repetition_penalty=base.repetition_penalty,
    )


def latest_image(turns: list[dict]) -> str | None:
    """The image an answer's boxes refer to: the last one shown (Qwen-VL's rule)."""
    images = [path for turn in turns for path in turn.get("images", [])]
    return images[-1] if images else None


def grounding(turns: list[dict], answer: str) -> tuple[Image.Image | None, str]:
    """(the latest image with the answer's boxes drawn, or None; one legend line per box)."""
    legend = "\n".join(box_legend(answer))
    path = latest_image(turns)
    if path is None:
        return None, legend
    return draw_answer_boxes(load_image(path), answer), legend
