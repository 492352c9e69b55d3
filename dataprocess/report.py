"""The one report of build, validate and training's record loading: every error and change.

Converters and the validator never drop or edit a record silently: they call
:meth:`Tally.error` or :meth:`Tally.change`, which logs the record id and file and keeps a count.
Counts ``read`` (record slots seen, unparsable ones included) and ``valid`` (records that passed
every check) are kept by the validator; every other record slot is invalid and has an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dataprocess.schema import RecordError

log = logging.getLogger(__name__)
EXAMPLES_PER_KIND = 5
MAX_EXAMPLES = 10  # full messages in describe()


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Issue:
        return cls(data["kind"], data["id"], data["file"], data["message"], data["index"])


@dataclass
class Tally:
    """Errors (the record is not usable) and changes (it was fixed, and we say how) of one source."""

    name: str
    errors: list[Issue] = field(default_factory=list)
    changes: list[Issue] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def error(self, exc: RecordError) -> None:
        # The first few are warnings; the rest go to the report (and -v) instead of flooding logs.
        level = logging.WARNING if len(self.errors) < MAX_EXAMPLES else logging.INFO
        log.log(level, "%s: %s", self.name, exc)
        self.errors.append(Issue(exc.kind, exc.record_id, exc.source, str(exc), exc.index))

    def change(self, kind: str, record_id: str | None, source: str, what: str) -> None:
        log.info("%s: %s, record %r: %s [%s]", self.name, source, record_id, what, kind)
        self.changes.append(Issue(kind, record_id, source, what))

    @property
    def num_invalid(self) -> int:
        """Record slots read that did not pass (a record with two problems counts once)."""
        return self.counts["read"] - self.counts["valid"]

    def problem_counts(self) -> dict[str, int]:
        """Errors per kind."""
        return dict(Counter(issue.kind for issue in self.errors))

    def describe(self, max_examples: int = MAX_EXAMPLES) -> str:
        """Counts per kind, then the first ``max_examples`` messages (each names id and file)."""
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.problem_counts().items()))
        read = self.counts["read"]
        lines = [f"{self.num_invalid} of {read} records in {self.name} are invalid ({kinds})"]
        lines += [f"  {issue.message}" for issue in self.errors[:max_examples]]
        if len(self.errors) > max_examples:
            lines.append(f"  ... and {len(self.errors) - max_examples} more")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything, for a cache; :meth:`from_json` reads it back."""
        return {
            "name": self.name,
            "counts": dict(self.counts),
            "errors": [issue.to_json() for issue in self.errors],
            "changes": [issue.to_json() for issue in self.changes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(
            data["name"],
            errors=[Issue.from_json(e) for e in data["errors"]],
            changes=[Issue.from_json(c) for c in data["changes"]],
            counts=Counter(data["counts"]),
        )

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
