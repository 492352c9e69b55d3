"""report.json and report.md of one run, and the side-by-side table of several runs."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.outputs import write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _cell(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(header: list[str], rows: list[list], text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` left-aligned, numbers right-aligned."""
    rule = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    """The report as markdown: what was run, the scores, one table per breakdown."""
    counts = report["counts"]
    source = report.get("model_weights") or f"answers file {report.get('answers_file')}"
    lines = [f"# {report['benchmark']} evaluation", "",
             f"- data: `{report['data']}`", f"- model: `{source}`",
             f"- questions: {counts['questions']} (answered {counts['answered']}, "
             f"unparsed {counts['unparsed']}, missing {counts['missing']})"]  # fmt: skip
    if report.get("skipped"):
        lines.append(f"- skipped: {len(report['skipped'])} question(s) that cannot be asked or "
                     "scored (listed in report.json)")  # fmt: skip
    if report.get("note"):
        lines.append(f"- note: {report['note']}")
    lines += ["", "## Scores", ""]
    lines += _table(["metric", "value"], [[k, v] for k, v in report["scores"].items()])
    for title, rows in report.get("breakdown", {}).items():
        columns = list(dict.fromkeys(metric for values in rows.values() for metric in values))
        lines += ["", f"## {title[0].upper()}{title[1:]}", ""]
        body = [[name, *(values.get(c, "") for c in columns)] for name, values in rows.items()]
        lines += _table([title.removeprefix("by "), *columns], body)
    return "\n".join(lines) + "\n"


def write_report(output_dir: Path, report: dict) -> None:
    write_text_atomic(output_dir / REPORT_JSON, json.dumps(report, indent=1, ensure_ascii=False))
    write_text_atomic(output_dir / REPORT_MD, render_markdown(report))


def compare_runs(run_dirs: list[Path]) -> str:
    """One markdown table: a row per benchmark score (and unparsed count), a column per run."""
    reports = []
    for run_dir in run_dirs:
        path = run_dir / REPORT_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {REPORT_JSON} (not an evaluation output dir)")
        reports.append(json.loads(path.read_text(encoding="utf-8")))
    names = [run_dir.name for run_dir in run_dirs]
    if len(set(names)) < len(names):  # same folder names under different parents
        names = [run_dir.as_posix() for run_dir in run_dirs]
    rows: dict[tuple[str, str], dict[int, object]] = {}
    for column, report in enumerate(reports):
        entries = [*report["scores"].items(), ("unparsed", report["counts"]["unparsed"])]
        for metric, value in entries:
            rows.setdefault((report["benchmark"], metric), {})[column] = value
    body = [
        [benchmark, metric, *(values.get(c, "-") for c in range(len(reports)))]
        for (benchmark, metric), values in rows.items()
    ]
    return "\n".join(_table(["benchmark", "metric", *names], body, text_columns=2)) + "\n"
