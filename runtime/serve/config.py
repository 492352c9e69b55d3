"""What a serving process is allowed to take: the model's public name, the key, and the limits on
requests, images, the queue and time. One frozen object, built by the CLI, read by every part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000


@dataclass(frozen=True)
class ServeConfig:
    """Limits and names of one server; every field is a flag of `python -m runtime.serve`."""

    model_name: str = "vlm"
    api_key: str | None = None  # None: no key asked for
    allowed_local_media_path: Path | None = None  # None: no local files at all
    max_request_bytes: int = 20 * MB  # the JSON body, base64 images included
    max_image_bytes: int = 10 * MB  # one image, encoded (the file or the decoded data: URL)
    max_image_pixels: int = 25_000_000  # one image, width x height (a small file can decode huge)
    max_images: int = 8  # images in one request, over all its messages
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # when a request names none
    queue_size: int = 64  # requests waiting for the model; more get 503
    request_timeout_s: float = 120.0  # from arrival to the last token
    max_batch_size: int = 8  # requests answered by one generate; 1 turns batching off
    batch_window_s: float = 0.05  # the longest a batch waits for more requests to join it

    def __post_init__(self) -> None:
        positive = {
            "--max_request_mb": self.max_request_bytes,
            "--max_image_mb": self.max_image_bytes,
            "--max_image_pixels": self.max_image_pixels,
            "--max_images": self.max_images,
            "--max_tokens_limit": self.max_tokens_limit,
            "--max_new_tokens": self.default_max_tokens,
            "--queue_size": self.queue_size,
            "--request_timeout": self.request_timeout_s,
            "--max_batch_size": self.max_batch_size,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.batch_window_s < 0:
            raise ValueError(f"--batch_window_ms must be >= 0, got {self.batch_window_s * 1000}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"--max_new_tokens {self.default_max_tokens} is above --max_tokens_limit "
                f"{self.max_tokens_limit}"
            )
        folder = self.allowed_local_media_path
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"--allowed_local_media_path {folder}: no such directory")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key (or $VLM_API_KEY) is empty")
