"""Reading record files: ``iter_raw_records`` yields the raw dicts of a JSON list or JSONL file.

Both formats are streamed, so memory does not grow with the file: JSON lines are read line by
line, a JSON list is parsed by ijson one record at a time after one checking pass that builds no
objects (a broken list is refused before any of its records is used). A leading UTF-8 BOM is
skipped in both formats. A record nested deeper than ``MAX_DEPTH`` levels (the record object is
level 1) is refused before anything builds it, in time and memory linear in its size
(:mod:`dataprocess.nesting`). Every fault is a :class:`~dataprocess.schema.RecordError` naming
the file and where: the line of a JSONL record, the line, column and byte offset of a JSON list's
fault (the index of a record nested too deep). Checking a raw dict against the schema is
:func:`dataprocess.schema.parse_record`'s job.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ijson

from dataprocess.nesting import NestingScanner
from dataprocess.schema import RecordError

_CHUNK = 1 << 16  # bytes per read of a record file
# Deepest nesting a record may have (the record object is level 1). Real records need about 5;
# the limit keeps every recursive step after reading (json, copies, hashing) far from the stack's.
MAX_DEPTH = 100
_BOM = b"\xef\xbb\xbf"

# Receives the error of one unreadable record slot (see iter_raw_records).
OnError = Callable[[RecordError], None]


def _decode(data: bytes, source: str, line: int | None = None, index: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"line {line}, " if line is not None else ""
        raise RecordError(
            f"{where}invalid UTF-8 at byte {exc.start}",
            kind="invalid_utf8",
            source=source,
            index=index,
        ) from None


def _too_deep_line(line: bytes) -> bool:
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False  # cannot nest deeper than it opens: the common case costs two counts
    return NestingScanner(MAX_DEPTH).feed(line) is not None


def _too_deep(where: str, source: str, index: int | None) -> RecordError:
    return RecordError(
        f"{where}nested deeper than {MAX_DEPTH} levels (the limit of "
        "dataprocess.reading.MAX_DEPTH); refused unread",
        kind="too_deep",
        source=source,
        index=index,
    )


def _parse_line(line: bytes, line_number: int, source: str, index: int) -> dict:
    """One JSONL line as a dict, or a RecordError naming the line (the caller decides)."""
    if _too_deep_line(line):
        raise _too_deep(f"line {line_number}: ", source, index)
    text = _decode(line, source, line_number, index).strip()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"line {line_number}: invalid JSON: {exc.msg} (column {exc.colno})",
            kind="invalid_json",
            source=source,
            index=index,
        ) from None
    if not isinstance(raw, dict):
        raise RecordError(
            f"line {line_number}: record is {type(raw).__name__}, not an object",
            kind="bad_type",
            source=source,
            index=index,
        )
    return raw


def _iter_jsonl(path: Path, source: str, on_error: OnError | None) -> Iterator[tuple[int, dict]]:
    index = 0
    with path.open("rb") as lines:  # line by line: memory does not grow with the file
        for line_number, line in enumerate(lines, start=1):
            if line_number == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]  # as in a JSON list: editors on Windows write one
            if not line.strip():
                continue  # blank lines (a trailing newline, for example) carry no record
            try:
                raw = _parse_line(line, line_number, source, index)
            except RecordError as exc:
                if on_error is None:
                    raise
                on_error(exc)  # one broken line is one bad record; the lines after it still count
            else:
                yield index, raw
            index += 1


class _Reader:
    """A binary file that counts the bytes it hands out; from ``slow_from`` on, one at a time.

    ijson's exceptions carry no position, so a fault is located by parsing again with the
    chunk that held it fed byte by byte: the parser fails right after the offending byte.
    """

    def __init__(
        self, file: Any, slow_from: int | None = None, scanner: NestingScanner | None = None
    ) -> None:
        self.file = file
        self.scanner = scanner  # sees every byte before the parser does (see nesting.py)
        self.position = file.tell()  # a byte offset in the file
        self.chunk_start = self.position
        self.at_end = False
        self.slow_from = slow_from

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""  # ijson probes the stream type with read(0)
        if self.slow_from is not None:
            if self.position >= self.slow_from:
                size = 1
            else:
                size = min(size if size > 0 else _CHUNK, self.slow_from - self.position)
        data = self.file.read(size)
        if self.scanner is not None and (index := self.scanner.feed(data)) is not None:
            raise _too_deep("", getattr(self.file, "name", ""), index)
        self.chunk_start = self.position
        self.position += len(data)
        self.at_end = not data
        return data


def _skip_bom(file: Any) -> None:
    if file.read(len(_BOM)) != _BOM:
        file.seek(0)


def _json_fault(path: Path, source: str, exc: Exception, chunk_start: int) -> RecordError:
    """The RecordError for an unparsable JSON list: kind, line, column and byte of the fault."""
    with path.open("rb") as file:
        _skip_bom(file)
        reader = _Reader(file, slow_from=max(chunk_start, file.tell()))
        try:
            for _ in ijson.basic_parse(reader, buf_size=_CHUNK):
                pass
        except ijson.JSONError as again:
            exc = again
        offset = reader.position if reader.at_end else reader.position - 1
    reason = str(exc).strip("b'\"").splitlines()[0].split("\\n")[0]
    if "UTF8" in reason:
        start = _utf8_fault(path)  # the parser stops a few bytes late, inside the bad sequence
        return RecordError(
            f"invalid UTF-8 at byte {offset if start is None else start}",
            kind="invalid_utf8",
            source=source,
        )
    line, column = _line_and_column(path, offset)
    return RecordError(
        f"invalid JSON: {reason} (line {line}, column {column}, byte {offset})",
        kind="invalid_json",
        source=source,
    )


def _utf8_fault(path: Path) -> int | None:
    """The byte offset where ``path`` stops being valid UTF-8, or None (decoding in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            held = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return done - held + exc.start
            done += len(chunk)
    return None


# UTF-8 continuation bytes: a character is any other byte, so columns are counted without decoding.
_CONTINUATION = bytes(range(0x80, 0xC0))


def _line_and_column(path: Path, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte ``offset``, reading in chunks."""
    line, column, done = 1, 1, 0
    with path.open("rb") as file:
        _skip_bom(file)
        done = file.tell()
        while done < offset and (chunk := file.read(min(_CHUNK, offset - done))):
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                line += chunk.count(b"\n")
                column = 1
            tail = chunk[newline + 1 :]  # the whole chunk when it holds no newline
            column += len(tail.translate(None, _CONTINUATION))
            done += len(chunk)
    return line, column


# JSON type of the first parse event -> the Python type name json.loads would have produced.
_TOP_TYPES = {
    "start_map": "dict",
    "start_array": "list",
    "string": "str",
    "boolean": "bool",
    "null": "NoneType",
}


def _top_type(path: Path, source: str) -> str:
    """The type name of a JSON document's top-level value, after checking the whole document.

    One pass of the C parser that builds no objects: a JSON list that breaks anywhere, or holds
    a record nested deeper than MAX_DEPTH, is refused before any of its records is yielded.
    """
    with path.open("rb") as file:
        _skip_bom(file)
        reader = _Reader(file, scanner=NestingScanner(MAX_DEPTH + 1))  # + 1: the list itself
        try:
            events = ijson.basic_parse(reader, buf_size=_CHUNK, use_float=True)
            event, value = next(events)
            for _ in events:
                pass
        except ijson.JSONError as exc:
            raise _json_fault(path, source, exc, reader.chunk_start) from None
    if event == "number":
        return type(value).__name__
    return _TOP_TYPES.get(event, event)


def _iter_json_list(
    path: Path, source: str, on_error: OnError | None
) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as file:
        _skip_bom(file)
        top = _top_type(path, source)
        if top != "list":
            raise RecordError(
                f"top level is {top}, expected a list of records", kind="not_a_list", source=source
            )
        reader = _Reader(file)
        # Streaming: one record in memory at a time; floats as float, not Decimal.
        items = ijson.items(reader, "item", use_float=True, buf_size=_CHUNK)
        index = 0
        while True:
            try:
                raw = next(items)
            except StopIteration:
                return
            except ijson.JSONError as exc:
                # Nothing after the fault can be trusted in a JSON list: the file is refused.
                raise _json_fault(path, source, exc, reader.chunk_start) from None
            if isinstance(raw, dict):
                yield index, raw
            else:
                fault = RecordError(
                    f"record is {type(raw).__name__}, not an object",
                    kind="bad_type",
                    source=source,
                    index=index,
                )
                if on_error is None:
                    raise fault
                on_error(fault)
            index += 1


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            if chunk.strip():
                return False
    return True


def iter_raw_records(
    path: str | Path, *, on_error: OnError | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, raw dict)`` from a JSON list (``.json``) or JSON lines (``.jsonl``) file.

    The file is read incrementally (JSONL line by line, a JSON list with ijson), so memory does
    not grow with its size. A fault of the whole file (unreadable, empty, not a list, a JSON
    list that does not parse) raises :class:`RecordError` naming the file and the position,
    before any record of the file is yielded. A fault of one record slot (a JSONL line that does not parse, an entry that is not an object) raises too, unless
    ``on_error`` is given: then it receives the error (naming file, index and line) and reading
    goes on, so a validator can count the slot as one invalid record and keep every record
    after it.
    """
    path = Path(path)
    source = str(path)
    try:
        blank = _is_blank(path)
    except OSError as exc:
        raise RecordError(
            f"cannot read file: {exc.strerror}", kind="unreadable_file", source=source
        ) from None
    if blank:
        raise RecordError("file is empty", kind="empty_file", source=source)
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, source, on_error)
    else:
        yield from _iter_json_list(path, source, on_error)
