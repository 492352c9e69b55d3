"""An `image_url` of a request -> a decoded RGB image, within the server's limits.

Accepted: `data:image/...;base64,...` URLs, and local files (`file:///abs/path` or a plain path)
only under `--allowed_local_media_path`, confined to it after symlinks are resolved. Remote
http(s) URLs are refused: the server fetches nothing from the network on a client's behalf. The
size in pixels is read from the header before the image is decoded, so a small file that would
decode huge (a "decompression bomb") is refused unopened.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from pathlib import Path

from PIL import Image

from runtime.serve.config import ServeConfig
from runtime.serve.errors import bad_request, too_large
from visual import load_image


def fetch_image(url: str, param: str, config: ServeConfig) -> Image.Image:
    """The image an `image_url.url` names; `ApiError` 400/413 naming `param` otherwise."""
    scheme = url[: url.find(":")].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(data_url_bytes(url, param, config), param, config)
    if scheme in ("http", "https"):
        raise bad_request(
            "remote image URLs are not fetched by this server; send the image inline as a "
            "data: URL (data:image/png;base64,...)",
            param,
        )
    if scheme in ("file", "") or Path(url).is_absolute():
        path = local_path(url, param, config)
        size = path.stat().st_size
        if size > config.max_image_bytes:
            raise too_large(f"{param}: the image is {size:,} bytes; the limit is "
                            f"{config.max_image_bytes:,} (--max_image_mb)", param)  # fmt: skip
        return decode_image(path.read_bytes(), param, config)
    raise bad_request(f"unsupported URL scheme {scheme!r}; use a data: URL", param)


def data_url_bytes(url: str, param: str, config: ServeConfig) -> bytes:
    """The bytes of a base64 `data:` URL, refused before decoding when too large."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise bad_request("a data: URL must be data:<mime type>;base64,<data>", param)
    if not header[5:].lower().startswith("image/"):
        raise bad_request(f"the data: URL holds {header[5:].split(';')[0]!r}, not an image", param)
    if len(payload) * 3 // 4 > config.max_image_bytes + 2:
        raise too_large(f"{param}: the image is about {len(payload) * 3 // 4:,} bytes; the limit "
                        f"is {config.max_image_bytes:,} (--max_image_mb)", param)  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URL is not valid base64", param) from None


def local_path(url: str, param: str, config: ServeConfig) -> Path:
    """A local file named by `url`, which must lie under `--allowed_local_media_path`."""
    root = config.allowed_local_media_path
    if root is None:
        raise bad_request(
            "local image files are refused unless the server is started with "
            "--allowed_local_media_path DIR; send the image as a data: URL",
            param,
        )
    text = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = Path(root).resolve()
    path = (root / text).resolve()  # an absolute `text` replaces root
    if not path.is_relative_to(root):
        raise bad_request(f"{text} is outside --allowed_local_media_path", param)
    if not path.is_file():
        raise bad_request(f"no such image file under --allowed_local_media_path: {text}", param)
    return path


def decode_image(data: bytes, param: str, config: ServeConfig) -> Image.Image:
    """Decode encoded image bytes to RGB, refusing too many pixels before decoding them."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; nothing to close
        width, height = image.size
        if width * height > config.max_image_pixels:
            raise too_large(f"{param}: the image is {width}x{height} pixels; the limit is "
                            f"{config.max_image_pixels:,} (--max_image_pixels)", param)  # fmt: skip
        image.load()
        return load_image(image)  # RGB, EXIF orientation applied, as for files
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise bad_request("not an image that can be decoded", param) from None
