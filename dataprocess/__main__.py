"""``python -m dataprocess {build,validate,stats,images,features,boxes}``: the data-preparation CLI.

- ``build --config dataprocess/config.yaml``: convert, sample, merge, validate, write chat.json
  plus ``<output>.report.json`` (and ``<output>.dropped.jsonl`` when records were rejected).
- ``validate --data chat.json --image_folder DIR``: the same checks on an existing file, the
  checks training runs too (``dataprocess/validate.py``).
- ``stats --data chat.json --vision_model M``: token lengths rendered exactly as training renders
  them (``dataset.conversation``), N tokens per image read from the tower (or ``--model_weights
  CHECKPOINT``, or ``--num_image_tokens``), and a histogram PNG (imports the model stack).
- ``images --data chat.json --image_folder DIR --cache DIR --size 336``: resize into a cache;
  ``--pad --vision_model M`` pads to a square with that tower's mean colour first.
- ``features --data chat.json --image_folder DIR --vision_model M --out DIR``: encode every image
  once with the frozen tower into a feature cache for ``train.py --feature_cache DIR`` (imports
  torch and ``visual``; see ``visual/feature_cache.py``).
- ``boxes --data chat.json --image_folder DIR --id RECORD_ID --out box.png``: draw a record's
  boxes (Qwen ``<box>`` or LLaVA ``[x1, y1, x2, y2]``) on its image (``dataprocess/boxes.py``).

Image paths must stay inside ``--image_folder`` (no absolute path, no ``..``) unless
``--allow_outside_image_folder``. Exit status 1 when errors remain (``--drop_invalid`` writes the
good records and exits 0), 2 for a bad config, flag or unreadable input (a JSON list that does
not parse, for one: nothing after the fault can be trusted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dataprocess.config import list_flag
from dataprocess.report import format_summary

log = logging.getLogger("dataprocess")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """Accept both ``--drop-invalid`` and ``--drop_invalid`` spellings."""
    dashed, underscored = "--" + name.replace("_", "-"), "--" + name.replace("-", "_")
    names = [dashed] if dashed == underscored else [underscored, dashed]
    parser.add_argument(*names, dest=name.replace("-", "_"), **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataprocess", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every change per record")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="convert and merge the sources of a config")
    _flag(build, "config", type=Path, required=True, help="YAML build config")
    _flag(build, "output", type=Path, help="override the config's output (.json or .jsonl)")
    _flag(build, "drop-invalid", action="store_true", help="write only the good records")
    _flag(build, "skip-image-check", action="store_true", help="do not open the images")
    _flag(build, "workers", type=int, default=8, help="threads for image checks")
    _outside_flag(build)

    validate = sub.add_parser("validate", help="check an existing chat.json / JSONL file")
    _flag(validate, "data", type=Path, required=True)
    _flag(validate, "image_folder", type=Path, help="image root; images are not opened without it")
    _flag(validate, "drop-invalid", action="store_true", help="write the good records to --output")
    _flag(validate, "output", type=Path, help="where --drop-invalid writes the good records")
    _flag(validate, "report", type=Path, help="JSON report path (default: next to --data)")
    _flag(validate, "workers", type=int, default=8)
    _outside_flag(validate)
    _add_stats_parser(sub)
    _add_images_parser(sub)
    _add_features_parser(sub)
    boxes = sub.add_parser("boxes", help="draw a record's boxes on its image (PNG)")
    _flag(boxes, "data", type=Path, required=True)
    _flag(boxes, "image_folder", type=Path, required=True)
    _flag(boxes, "id", required=True, help="the record's id")
    _flag(boxes, "out", type=Path, required=True, help="PNG path; _<k> added per further image")
    _outside_flag(boxes)
    return parser


def _add_stats_parser(sub: argparse._SubParsersAction) -> None:
    stats = sub.add_parser("stats", help="token-length statistics and histogram (needs torch)")
    _flag(stats, "data", type=Path, required=True)
    _vision_flags(stats, "the tower whose tokens per image are counted")
    _flag(stats, "model_weights", type=Path, help="a checkpoint dir: N (and system prompt) from it")
    _flag(stats, "num_image_tokens", type=int, help="override N, e.g. 576 CLIP-L/336, 729 SigLIP")
    _flag(stats, "histogram", type=Path, help="PNG path (default: <data>.lengths.png)")
    _flag(stats, "model_max_length", type=int, help="report how many records exceed it")
    _flag(stats, "system", help="system prompt for records without one (default: training's)")
    _flag(stats, "image_folder", type=Path, help="image root, read when tokens depend on size")
    _flag(stats, "image_aspect_ratio", help="anyres: count tiles by image size (train.py's flag)")
    _flag(stats, "image_grid_pinpoints", type=list_flag, help="anyres: as train.py's")
    _flag(stats, "image_max_tiles", type=int, help="anyres: as train.py's")


def _add_images_parser(sub: argparse._SubParsersAction) -> None:
    images = sub.add_parser("images", help="resize referenced images into a cache folder")
    _flag(images, "data", type=Path, required=True)
    _flag(images, "image_folder", type=Path, required=True)
    _flag(images, "cache", type=Path, required=True)
    _flag(images, "size", type=int, help="input size, e.g. 336 (default: --vision_model's)")
    _flag(images, "pad", action="store_true", help="pad to a square (tower's mean colour) first")
    _vision_flags(images, "the tower whose mean colour pads and whose input size is --size")
    _flag(images, "workers", type=int, default=4)
    _outside_flag(images)


def _outside_flag(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser,
        "allow_outside_image_folder",
        action="store_true",
        help="accept image paths that are absolute or leave --image_folder with '..'",
    )


def _vision_flags(parser: argparse.ArgumentParser, what: str) -> None:
    _flag(parser, "vision_model", help=f"{what}, as train.py's --vision_model")
    # No choices= here: visual.loading.LIBRARIES owns the list (and needs torch to import).
    _flag(parser, "vision_library", default="transformers", help="as train.py's --vision_library")
    _flag(parser, "vision_pretrained", help="open_clip pretrained tag or weights file")


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    features = sub.add_parser("features", help="encode every image with a frozen tower (torch)")
    _flag(features, "data", type=Path, nargs="+", required=True, help="one or more records files")
    _flag(features, "image_folder", type=Path, required=True)
    _flag(features, "vision_model", required=True, help="as train.py's --vision_model")
    _flag(features, "vision_library", default="transformers", help="as train.py's")
    _flag(features, "vision_pretrained", help="open_clip pretrained tag or weights file")
    _flag(features, "vision_feature_layer", type=int, default=-2)
    # No default or choices here: visual.preprocessing owns both (checked when the tower loads).
    _flag(features, "image_aspect_ratio", help="as train.py's (default: the same as training's)")
    _flag(features, "batch_size", type=int, default=32)
    _flag(features, "dtype", default="float16", choices=("float16", "float32"), help="storage")
    _flag(features, "device", default="cpu", help="cpu, cuda, cuda:1 ...")
    _flag(
        features, "workers", type=int,
        help="image-decoding worker processes (default: up to 4, one less than the CPU cores)",
    )  # fmt: skip
    _flag(features, "out", type=Path, required=True, help="the cache directory to create")
    _outside_flag(features)


def _run_build(args: argparse.Namespace) -> int:
    from dataprocess.build import build
    from dataprocess.config import load_config

    config = load_config(args.config)
    check = False if args.skip_image_check else None
    report = build(
        config,
        output=args.output,
        drop_invalid=args.drop_invalid,
        check_images=check,
        workers=args.workers,
        allow_outside_image_folder=args.allow_outside_image_folder,
    )
    print(report["summary"])
    return 0 if report["ok"] or args.drop_invalid else 1


def _run_validate(args: argparse.Namespace) -> int:
    from dataprocess.build import side_paths, write_dropped, write_records
    from dataprocess.validate import validate_file

    if args.drop_invalid and args.output is None:
        raise ValueError("--drop-invalid needs --output (where the good records go)")
    if args.image_folder is not None and not args.image_folder.is_dir():
        raise ValueError(f"--image_folder {args.image_folder}: no such directory")
    good, tally = validate_file(
        args.data, args.image_folder, args.workers, allow_outside=args.allow_outside_image_folder
    )
    # The good records stream to --output as they are checked; without it they are only counted.
    written = write_records(good, args.output) if args.drop_invalid else sum(1 for _ in good)
    ok = not tally.errors
    report = {
        "data": str(args.data),
        "image_folder": str(args.image_folder or ""),
        "ok": ok,
        "errors": len(tally.errors),
        "written": 0,
        "dropped": tally.num_invalid,
        "sources": {tally.name: tally.summary()},
    }
    report_path, dropped_path = side_paths(args.output or args.data)
    if args.drop_invalid:
        report["written"] = written
    if tally.errors and args.drop_invalid:
        write_dropped([tally], dropped_path)
        report["dropped_list"] = str(dropped_path)
    report_path = args.report or report_path
    report_path.write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    print(format_summary(report))
    print(f"report: {report_path}")
    return 0 if ok or args.drop_invalid else 1


def _run_stats(args: argparse.Namespace) -> int:
    from dataprocess.stats import run_stats
    from dataprocess.stats_settings import resolve_settings

    settings = resolve_settings(
        num_image_tokens=args.num_image_tokens,
        vision_model=args.vision_model,
        vision_library=args.vision_library,
        vision_pretrained=args.vision_pretrained,
        model_weights=args.model_weights,
        system=args.system,
        tiling={
            "image_aspect_ratio": args.image_aspect_ratio,
            "image_grid_pinpoints": args.image_grid_pinpoints,
            "image_max_tiles": args.image_max_tiles,
        },
    )
    summary = run_stats(
        args.data,
        settings.image_processor,
        args.histogram,
        args.model_max_length,
        settings.system,
        image_folder=args.image_folder,
    )
    summary["num_image_tokens_from"] = settings.num_image_tokens_from
    print(json.dumps(summary, indent=2))
    return 0


def _run_images(args: argparse.Namespace) -> int:
    from dataprocess.process_image import process_images, tower_geometry

    size, pad_color = args.size, None
    if args.vision_model:
        tower_size, mean_color = tower_geometry(
            args.vision_model, args.vision_library, args.vision_pretrained
        )
        size, pad_color = size or tower_size, mean_color
    if size is None:
        raise ValueError("images needs --size, or --vision_model to read the input size from")
    if args.pad and pad_color is None:
        raise ValueError(
            "--pad needs --vision_model: the pad colour is the tower's own mean colour "
            "(CLIP and SigLIP differ)"
        )
    result = process_images(
        args.data,
        args.image_folder,
        args.cache,
        size,
        pad_color if args.pad else None,
        args.workers,
        allow_outside=args.allow_outside_image_folder,
    )
    print(json.dumps(result, indent=2))
    return 0


def _run_features(args: argparse.Namespace) -> int:
    import time

    from dataprocess.process_image import referenced_images
    from visual import ImageLoadError, load_vision_tower
    from visual.feature_cache import FEATURES_FILE, default_workers, encode_feature_cache

    if args.image_aspect_ratio == "anyres":  # refused before any file is read
        raise ValueError(
            "--image_aspect_ratio anyres: a feature cache holds one [N, Dv] grid per image, not "
            "an image's tiles; train an anyres model from the images"
        )
    paths = [
        path
        for data in args.data
        for path in referenced_images(
            data, args.image_folder, allow_outside=args.allow_outside_image_folder
        )
    ]
    aspect = {"image_aspect_ratio": args.image_aspect_ratio} if args.image_aspect_ratio else {}
    tower = load_vision_tower(
        args.vision_model,
        library=args.vision_library,
        pretrained=args.vision_pretrained,
        feature_layer=args.vision_feature_layer,
        device=args.device,
        **aspect,
    )
    began = time.perf_counter()
    workers = default_workers() if args.workers is None else args.workers
    try:
        out = encode_feature_cache(
            tower, paths, args.image_folder, args.out,
            batch_size=args.batch_size, dtype=args.dtype, num_workers=workers,
        )  # fmt: skip
    except ImageLoadError as error:
        raise ValueError(
            f"{_record_of(args.data, error.image)}: {error}; no cache was written (fix the "
            "image, or drop the record: `python -m dataprocess validate --drop_invalid`)"
        ) from None
    seconds = time.perf_counter() - began
    size = (out / FEATURES_FILE).stat().st_size
    images = len(set(paths))
    log.info("%d images -> %s: %.1f MB in %.1f s", images, out, size / 1e6, seconds)
    result = {
        "images": images,
        "shape": [images, tower.num_image_tokens, tower.hidden_size],
        "dtype": args.dtype,
        "bytes": size,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 1),
        "cache": str(out),
    }
    print(json.dumps(result, indent=2))
    return 0


def _record_of(data: list[Path], image: str | None) -> str:
    """'record ID of FILE' for the first record that shows `image` (as the records spell it)."""
    from dataprocess.reading import iter_raw_records
    from dataprocess.schema import parse_record

    for path in data:
        for index, raw in iter_raw_records(path):
            record = parse_record(raw, source=str(path), index=index)
            if image in record.images:
                return f"record {record.id!r} of {path}"
    return f"an image of {', '.join(map(str, data))}"


def _run_boxes(args: argparse.Namespace) -> int:
    from dataprocess.boxes import draw_record_boxes
    from dataprocess.reading import iter_raw_records
    from dataprocess.schema import parse_record

    for index, raw in iter_raw_records(args.data):
        if str(raw.get("id")) == args.id:
            record = parse_record(raw, source=str(args.data), index=index)
            break
    else:
        raise ValueError(f"--id {args.id}: no such record in {args.data}")
    drawings = draw_record_boxes(
        record, args.image_folder, allow_outside=args.allow_outside_image_folder
    )
    if not drawings:
        raise ValueError(f"record {args.id!r} in {args.data} has no box")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for k, (_, drawing) in enumerate(drawings):
        path = args.out if k == 0 else args.out.with_name(f"{args.out.stem}_{k}{args.out.suffix}")
        drawing.save(path)
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run one subcommand; returns the exit status."""
    from dataprocess.config import ConfigError
    from dataprocess.schema import RecordError

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    runners = {
        "build": _run_build,
        "validate": _run_validate,
        "stats": _run_stats,
        "images": _run_images,
        "features": _run_features,
        "boxes": _run_boxes,
    }
    try:
        return runners[args.command](args)
    except (ConfigError, RecordError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
