"""`python -m runtime.serve [--model_weights DIR]`: an OpenAI-compatible API for a trained model.

Safe by default: it listens on 127.0.0.1 only (`--host 0.0.0.0` to open it, best with
`--api_key`), fetches no remote image URLs, reads local image files only under
`--allowed_local_media_path`, and limits the request body, each image's bytes and pixels, the
images per request, `max_tokens`, the queue and the time per request (see `ServeConfig`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("runtime.serve")

API_KEY_ENV = "VLM_API_KEY"  # kept out of the process list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from model.config import DTYPE_NAMES
    from runtime.cli import add_checkpoint_flags
    from runtime.serve.config import ServeConfig

    default = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model_weights", "--checkpoint", default="outputs/demo",
                   help="a training output, checkpoint or merged directory")  # fmt: skip
    add_checkpoint_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--system_prompt", help="default: the one recorded at training time")
    p.add_argument("--served_model_name", help="the model name clients send (default: the "
                   "--model_weights folder's name)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"required as 'Authorization: Bearer KEY' (or ${API_KEY_ENV})")  # fmt: skip
    p.add_argument("--allowed_local_media_path", type=Path,
                   help="let image_url name local files under this folder (default: none)")  # fmt: skip
    mb = 1_000_000
    p.add_argument("--max_request_mb", type=float, default=default.max_request_bytes / mb)
    p.add_argument("--max_image_mb", type=float, default=default.max_image_bytes / mb)
    p.add_argument("--max_image_pixels", type=int, default=default.max_image_pixels)
    p.add_argument("--max_images", type=int, default=default.max_images)
    p.add_argument("--max_tokens_limit", type=int, default=default.max_tokens_limit)
    p.add_argument("--max_new_tokens", type=int, default=default.default_max_tokens,
                   help="max_tokens of a request that names none")  # fmt: skip
    p.add_argument("--queue_size", type=int, default=default.queue_size)
    p.add_argument("--request_timeout", type=float, default=default.request_timeout_s,
                   help="seconds from arrival to the last token")  # fmt: skip
    p.add_argument("--max_batch_size", type=int, default=default.max_batch_size)
    p.add_argument("--batch_window_ms", type=float, default=default.batch_window_s * 1000,
                   help="how long a lone request waits for others to share its batch")  # fmt: skip
    p.add_argument("--no_batching", action="store_true", help="answer one request at a time")
    return p.parse_args(argv)


def serve_config(args: argparse.Namespace):
    from runtime.serve.config import ServeConfig

    mb = 1_000_000
    return ServeConfig(
        model_name=args.served_model_name or Path(args.model_weights).resolve().name,
        api_key=args.api_key,
        allowed_local_media_path=args.allowed_local_media_path,
        max_request_bytes=int(args.max_request_mb * mb),
        max_image_bytes=int(args.max_image_mb * mb),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.max_new_tokens,
        queue_size=args.queue_size,
        request_timeout_s=args.request_timeout,
        max_batch_size=1 if args.no_batching else args.max_batch_size,
        batch_window_s=0.0 if args.no_batching else args.batch_window_ms / 1000,
    )


def build(args: argparse.Namespace):
    """(app, config) for the parsed flags: the checkpoint loaded, the scheduler ready."""
    from runtime.cli import checkpoint_overrides
    from runtime.inference import InferenceSession
    from runtime.serve.app import build_app
    from runtime.serve.scheduler import BatchScheduler

    config = serve_config(args)  # checked before the model loads
    session = InferenceSession.from_checkpoint(
        args.model_weights, system_prompt=args.system_prompt, dtype=args.dtype,
        **checkpoint_overrides(args),
    )  # fmt: skip
    scheduler = BatchScheduler(session, max_batch_size=config.max_batch_size,
                               batch_window_s=config.batch_window_s,
                               queue_size=config.queue_size)  # fmt: skip
    return build_app(session, config, scheduler), config


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app, config = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("--host %s without --api_key: anyone who reaches it can use the model",
                       args.host)  # fmt: skip
    logger.info("serving %r on http://%s:%d/v1", config.model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line
        logger.error("%s", error)
        sys.exit(2)
