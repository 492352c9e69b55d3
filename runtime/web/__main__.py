"""`python -m runtime.web [--model_weights DIR]`: the web chat for a trained or merged model.

Safe by default: it listens on 127.0.0.1 only (`--host 0.0.0.0` to open it to the network, best
with `--auth`), makes no public share link unless `--share`, takes uploads up to
`--max_file_size` (images only) and answers one request at a time, the others waiting in a queue
of at most `--queue_size`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("runtime.web")

AUTH_ENV = "VLM_WEB_AUTH"  # user:password, kept out of the process list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from model.config import DTYPE_NAMES
    from runtime.cli import add_checkpoint_flags
    from runtime.inference import GenerationSettings

    p = argparse.ArgumentParser(prog="python -m runtime.web", description=__doc__.split("\n")[0])
    p.add_argument("--model_weights", "--checkpoint", default="outputs/demo",
                   help="a training output, checkpoint or merged directory")  # fmt: skip
    add_checkpoint_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    p.add_argument("--system_prompt", help="default: the one recorded at training time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument("--auth", default=os.environ.get(AUTH_ENV),
                   help=f"user:password required to open the page (or ${AUTH_ENV})")  # fmt: skip
    p.add_argument("--max_file_size", default="10mb", help="largest upload, e.g. 10mb, 500kb")
    p.add_argument("--queue_size", type=int, default=16,
                   help="requests that may wait for the model; more are refused")  # fmt: skip
    GenerationSettings.add_flags(p)  # the page's starting settings
    return p.parse_args(argv)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:password` -> (user, password); both parts must be non-empty."""
    if value is None:
        return None
    user, _, password = value.partition(":")
    if not user or not password:
        raise ValueError(
            f"--auth must be user:password (or ${AUTH_ENV}), got {value.split(':')[0]!r}:…"
        )
    return user, password


def main(argv: list[str] | None = None) -> None:
    from runtime.cli import silence_known_warnings

    silence_known_warnings()
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    if args.queue_size < 1:
        raise ValueError(f"--queue_size must be at least 1, got {args.queue_size}")
    from runtime.cli import checkpoint_overrides
    from runtime.inference import GenerationSettings, InferenceSession
    from runtime.web.app import build_app, launch

    session = InferenceSession.from_checkpoint(
        args.model_weights,
        system_prompt=args.system_prompt,
        settings=GenerationSettings.from_args(args),
        dtype=args.dtype,
        **checkpoint_overrides(args),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        logger.warning(
            "--host %s without --auth: anyone who reaches it can use the model", args.host
        )
    launch(
        build_app(session),
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        max_file_size=args.max_file_size,
        queue_size=args.queue_size,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line
        logger.error("%s", error)
        sys.exit(2)
