"""Bookkeeping for build and validate: every error and every change, by kind, with example ids.

Converters and the validator never drop or edit a record silently: they call
:meth:`Tally.error` or :meth:`Tally.change`, which logs the record id and file and keeps a count.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dataprocess.schema import RecordError

log = logging.getLogger(__name__)
EXAMPLES_PER_KIND = 5


@dataclass(frozen=True)
class Issue:
    """One error or change: what kind, which record, which file, what happened."""

    kind: str
    record_id: str | None
    source: str
    message: str
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.record_id,
            "index": self.index,
            "file": self.source,
            "message": self.message,
        }


@dataclass
class Tally:
    """Errors (the record is not usable) and changes (it was fixed, and we say how) of one source."""

    name: str
    errors: list[Issue] = field(default_factory=list)
    changes: list[Issue] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def error(self, exc: RecordError) -> None:
        log.warning("%s: %s", self.name, exc)
        self.errors.append(Issue(exc.kind, exc.record_id, exc.source, str(exc), exc.index))

    def change(self, kind: str, record_id: str | None, source: str, what: str) -> None:
        log.info("%s: %s, record %r: %s [%s]", self.name, source, record_id, what, kind)
        self.changes.append(Issue(kind, record_id, source, what))

    def summary(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "errors": _by_kind(self.errors),
            "changes": _by_kind(self.changes),
        }


def _by_kind(issues: list[Issue]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for issue in issues:
        entry = grouped.setdefault(issue.kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            label = issue.record_id
            if label is None:  # a file-level fault, or a record without an id
                label = f"index {issue.index}" if issue.index is not None else issue.source
            entry["examples"].append(label)
    return grouped


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines for stdout; the JSON report holds the details."""
    lines = [f"records written: {report.get('written', 0)}  dropped: {report.get('dropped', 0)}"]
    for name, part in report.get("sources", {}).items():
        counts = ", ".join(f"{k}={v}" for k, v in sorted(part["counts"].items()))
        lines.append(f"  {name}: {counts}")
        for section in ("errors", "changes"):
            for kind, entry in sorted(part[section].items()):
                examples = ", ".join(map(str, entry["examples"]))
                lines.append(f"    {section[:-1]} {kind}: {entry['count']} (e.g. {examples})")
    lines.append("status: " + ("OK" if report.get("ok") else "ERRORS REMAIN"))
    return "\n".join(lines)
