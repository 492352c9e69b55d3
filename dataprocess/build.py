"""``build``: convert every configured source, sample, merge, validate and write chat.json.

Ids become ``<source name>_<source id>``, so samples from different sources never collide (a
duplicate across sources keeps both); a repeated id inside one source gets ``_dup<k>``, logged.
Sampling is per source (all / first N / random N with the source seed, kept in file order), and
the merged list is shuffled with the config seed, so the same config gives the same file.

No list of records is held, so a million records build in bounded memory: each source's records
go to a spool file (:mod:`dataprocess.spool`) as they are converted; sampling, renaming and the
shuffle work on the spool's byte offsets (8 bytes a record); then the records are read back in
the final order, validated and streamed into the output. What still grows with the data: the
ids seen (a dict per source for the renaming and the validator's set for duplicates: they cannot
be found without them) and the offsets, about 130 bytes a record in all (176 MiB peak at 1M
records, docs/PERFORMANCE.md), and the errors and changes of the report.
"""

from __future__ import annotations

import json
import logging
import os
import random
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dataprocess.config import BuildConfig, SourceConfig
from dataprocess.report import Tally, format_summary
from dataprocess.schema import Record, record_to_json
from dataprocess.sources import converter_for
from dataprocess.spool import RecordSpool
from dataprocess.validate import RecordValidator

log = logging.getLogger(__name__)


def sample_indices(count: int, source: SourceConfig) -> Sequence[int]:
    """Which of ``count`` converted records the source's sampling keeps, in file order."""
    if source.sample == "all" or source.n is None or source.n >= count:
        return range(count)
    if source.sample == "first":
        return range(source.n)
    return sorted(random.Random(source.seed).sample(range(count), source.n))


def sample_records(records: list[Record], source: SourceConfig) -> list[Record]:
    """Apply the source's sampling; random picks keep their order in the file."""
    return [records[i] for i in sample_indices(len(records), source)]


def _join_image(prefix: str, path: str) -> str:
    if not prefix or Path(path).is_absolute():
        return path
    return f"{prefix.rstrip('/')}/{path.lstrip('/')}"


def rename_duplicates(
    spool: RecordSpool, offsets: Iterable[int], source: SourceConfig, tally: Tally
) -> dict[int, str]:
    """Spool offset -> new id (``<name>_<id>_dup<k>``, logged) for each sampled record whose
    prefixed id repeats an earlier one of the source; the others keep ``<name>_<id>``."""
    seen: dict[str, int] = {}
    renamed: dict[int, str] = {}
    for offset in offsets:
        record_id = spool.read_id(offset)
        new_id = f"{source.name}_{record_id}"
        if new_id in seen:
            seen[new_id] += 1
            renamed[offset] = f"{new_id}_dup{seen[new_id]}"
            where = spool.read(offset).source
            tally.change("renamed_duplicate_id", record_id, where, f"id is now {renamed[offset]!r}")
        else:
            seen[new_id] = 0
    return renamed


@dataclass
class Merged:
    """What the build keeps of the merged records while they wait in the spool."""

    offsets: array  # spool offset of every sampled record, in merge (then shuffled) order
    starts: list[int]  # spool offset where each source's records begin: a record's source
    renamed: dict[int, str]  # spool offset -> new id, for repeated ids only

    def records(
        self, spool: RecordSpool, config: BuildConfig, tallies: list[Tally]
    ) -> Iterator[tuple[Record, Tally]]:
        """The records in merged order, prefixed, each with its source's tally."""
        for offset in self.offsets:
            index = bisect_right(self.starts, offset) - 1
            source, record = config.sources[index], spool.read(offset)
            new_id = self.renamed.get(offset) or f"{source.name}_{record.id}"
            images = tuple(_join_image(source.image_prefix, p) for p in record.images)
            yield replace(record, id=new_id, images=images), tallies[index]


def write_records(
    records: Iterable[Record], path: Path, keep: Callable[[], bool] | None = None
) -> int:
    """Write records as a JSON list (one record per line) or JSONL, atomically, as they come (a
    generator of a million records is never held in memory); returns how many there were.
    ``keep``, asked once all are written, can refuse the file: ``path`` then stays as it was."""
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
        if keep is not None and not keep():
            tmp.unlink()
            return count
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def _write_valid(
    good: Iterable[Record], output: Path, tallies: list[Tally], drop_invalid: bool
) -> int:
    """Stream the valid records into ``output``, kept only when the build succeeds (no error at
    all, or ``drop_invalid``); returns how many were valid either way."""

    def succeeded() -> bool:
        return drop_invalid or not any(t.errors for t in tallies)

    if not succeeded():  # a conversion error already fails the build: validate for the report
        return sum(1 for _ in good)
    return write_records(good, output, keep=succeeded)


def write_dropped(tallies: list[Tally], path: Path) -> int:
    """Write one JSON line per error (source, id, file, kind, message); return how many."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for tally in tallies:
            for issue in tally.errors:
                line = json.dumps({"source": tally.name} | issue.to_json(), ensure_ascii=False)
                handle.write(line + "\n")
                count += 1
    return count


def side_paths(output: Path) -> tuple[Path, Path]:
    """Where the report and the dropped-record list go, next to the output."""
    stem = output.with_suffix("")
    return Path(f"{stem}.report.json"), Path(f"{stem}.dropped.jsonl")


def convert_all(config: BuildConfig, spool: RecordSpool) -> tuple[list[Tally], Merged]:
    """Convert every source into ``spool``, sample, rename repeated ids, shuffle."""
    tallies: list[Tally] = []
    merged = Merged(array("q"), [], {})
    for source in config.sources:
        tally = Tally(source.name)
        tallies.append(tally)
        merged.starts.append(spool.size)
        converted = spool.extend(converter_for(source.format)(source, tally))
        tally.counts["converted"] = len(converted)
        sampled = array("q", (converted[i] for i in sample_indices(len(converted), source)))
        del converted
        tally.counts["sampled"] = len(sampled)
        merged.renamed.update(rename_duplicates(spool, sampled, source, tally))
        merged.offsets.extend(sampled)
    if config.shuffle:
        # The permutation depends only on the length: the same order the list of records got.
        random.Random(config.seed).shuffle(merged.offsets)
    return tallies, merged


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
    output.parent.mkdir(parents=True, exist_ok=True)
    do_images = config.check_images if check_images is None else check_images
    validator = RecordValidator(
        config.image_root,
        check_images=do_images,
        allow_outside=allow_outside_image_folder,
        workers=workers,
    )
    with RecordSpool(output.parent) as spool:
        tallies, merged = convert_all(config, spool)
        conversion_errors = sum(len(t.errors) for t in tallies)
        for tally in tallies:
            tally.counts["valid"] = 0  # the validator counts up from here
        good = validator.validate_tallied(merged.records(spool, config, tallies))
        valid = _write_valid(good, output, tallies, drop_invalid)
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
        "written": valid if errors == 0 or drop_invalid else 0,
        # records lost to conversion faults plus records that failed validation
        "dropped": conversion_errors + len(merged.offsets) - valid,
        "sources": {t.name: t.summary() for t in tallies},
        "source_settings": _settings(config),
    }
    report_path, dropped_path = side_paths(output)
    if errors:
        write_dropped(tallies, dropped_path)
        report["dropped_list"] = str(dropped_path)
    text = json.dumps(report, ensure_ascii=False, indent=2, default=list)
    report_path.write_text(text + "\n", encoding="utf-8")
    log.info("report written to %s", report_path)
    report["summary"] = format_summary(report)
    return report
