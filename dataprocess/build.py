"""``build``: convert every configured source, sample, merge, validate and write chat.json.

Ids become ``<source name>_<source id>``, so samples from different sources never collide (a
duplicate across sources keeps both); a repeated id inside one source gets ``_dup<k>``, logged.
Sampling is per source (all / first N / random N with the source seed, kept in file order), and
the merged list is shuffled with the config seed, so the same config gives the same file.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dataprocess.config import BuildConfig, SourceConfig
from dataprocess.report import Tally, format_summary
from dataprocess.schema import Record, record_to_json
from dataprocess.sources import converter_for
from dataprocess.validate import RecordValidator

log = logging.getLogger(__name__)


def sample_records(records: list[Record], source: SourceConfig) -> list[Record]:
    """Apply the source's sampling; random picks keep their order in the file."""
    if source.sample == "all" or source.n is None:
        return records
    if source.sample == "first":
        return records[: source.n]
    if source.n >= len(records):
        return records
    picked = sorted(random.Random(source.seed).sample(range(len(records)), source.n))
    return [records[i] for i in picked]


def _join_image(prefix: str, path: str) -> str:
    if not prefix or Path(path).is_absolute():
        return path
    return f"{prefix.rstrip('/')}/{path.lstrip('/')}"


def prefix_records(records: list[Record], source: SourceConfig, tally: Tally) -> list[Record]:
    """Prefix ids with the source name and image paths with ``image_prefix``; make ids unique."""
    seen: dict[str, int] = {}
    out = []
    for record in records:
        new_id = f"{source.name}_{record.id}"
        if new_id in seen:
            seen[new_id] += 1
            renamed = f"{new_id}_dup{seen[new_id]}"
            tally.change("renamed_duplicate_id", record.id, record.source, f"id is now {renamed!r}")
            new_id = renamed
        else:
            seen[new_id] = 0
        images = tuple(_join_image(source.image_prefix, p) for p in record.images)
        out.append(replace(record, id=new_id, images=images))
    return out


def write_records(records: Iterable[Record], path: Path) -> int:
    """Write records as a JSON list (one record per line) or JSONL, atomically, as they come (a
    generator of a million records is never held in memory); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = path.suffix.lower() == ".jsonl"
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            out.write("" if jsonl else "[")
            for record in records:
                line = json.dumps(record_to_json(record), ensure_ascii=False)
                out.write(line + "\n" if jsonl else ("\n" if count == 0 else ",\n") + line)
                count += 1
            out.write("" if jsonl else ("\n]\n" if count else "]\n"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def write_dropped(tallies: list[Tally], path: Path) -> int:
    """Write one JSON line per error (id, file, kind, message); return how many."""
    issues = [issue for tally in tallies for issue in tally.errors]
    with path.open("w", encoding="utf-8") as handle:
        for issue in issues:
            handle.write(
                json.dumps(
                    {"source": _source_of(tallies, issue)} | issue.to_json(), ensure_ascii=False
                )
                + "\n"
            )
    return len(issues)


def _source_of(tallies: list[Tally], issue: Any) -> str:
    return next((t.name for t in tallies if issue in t.errors), "")


def side_paths(output: Path) -> tuple[Path, Path]:
    """Where the report and the dropped-record list go, next to the output."""
    stem = output.with_suffix("")
    return Path(f"{stem}.report.json"), Path(f"{stem}.dropped.jsonl")


def convert_all(config: BuildConfig) -> tuple[list[Tally], dict[str, Tally], list[Record]]:
    """Convert, sample and prefix every source: (tallies, id -> owning tally, merged records)."""
    tallies: list[Tally] = []
    owner: dict[str, Tally] = {}
    merged: list[Record] = []
    for source in config.sources:
        tally = Tally(source.name)
        tallies.append(tally)
        converted = list(converter_for(source.format)(source, tally))
        tally.counts["converted"] = len(converted)
        sampled = prefix_records(sample_records(converted, source), source, tally)
        tally.counts["sampled"] = len(sampled)
        for record in sampled:
            owner[record.id] = tally
        merged.extend(sampled)
    if config.shuffle:
        random.Random(config.seed).shuffle(merged)
    return tallies, owner, merged


def _settings(config: BuildConfig) -> dict[str, Any]:
    """Per-source options worth keeping next to the output (seeds and prompts, checklist 7)."""
    keys = ("format", "sample", "n", "seed", "prompts")
    return {s.name: {k: getattr(s, k) for k in keys} for s in config.sources}


def build(
    config: BuildConfig,
    *,
    output: Path | None = None,
    drop_invalid: bool = False,
    check_images: bool | None = None,
    workers: int = 8,
    allow_outside_image_folder: bool = False,
) -> dict[str, Any]:
    """Run the whole build; returns the report (also written next to the output).

    Image paths must stay inside ``config.image_root`` (the training --image_folder) unless
    ``allow_outside_image_folder``; they are confined even when images are not opened.
    """
    output = (output or config.output).resolve()
    tallies, owner, merged = convert_all(config)
    conversion_errors = sum(len(t.errors) for t in tallies)
    do_images = config.check_images if check_images is None else check_images
    validator = RecordValidator(
        config.image_root,
        check_images=do_images,
        allow_outside=allow_outside_image_folder,
        workers=workers,
    )
    for tally in tallies:
        tally.counts["valid"] = 0  # the validator counts up from here
    good = list(validator.validate(merged, lambda r: owner[r.id]))
    errors = sum(len(t.errors) for t in tallies)
    report: dict[str, Any] = {
        "config": str(config.config_path or ""),
        "output": str(output),
        "image_root": str(config.image_root),
        "seed": config.seed,
        "shuffle": config.shuffle,
        "images_checked": do_images,
        "ok": errors == 0,
        "errors": errors,
        "written": 0,
        # records lost to conversion faults plus records that failed validation
        "dropped": conversion_errors + len(merged) - len(good),
        "sources": {t.name: t.summary() for t in tallies},
        "source_settings": _settings(config),
    }
    report_path, dropped_path = side_paths(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if errors == 0 or drop_invalid:
        write_records(good, output)
        report["written"] = len(good)
    if errors:
        write_dropped(tallies, dropped_path)
        report["dropped_list"] = str(dropped_path)
    text = json.dumps(report, ensure_ascii=False, indent=2, default=list)
    report_path.write_text(text + "\n", encoding="utf-8")
    log.info("report written to %s", report_path)
    report["summary"] = format_summary(report)
    return report
