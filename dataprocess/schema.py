"""The canonical record: one owner for the LLaVA ``chat.json`` schema used across the project.

A record is an id, the images it shows (paths relative to an image folder) and its turns: an
optional leading system turn, then user/assistant alternating, ending with an assistant turn.
Every ``<image>`` marker sits in a user turn, one per image, in order.

``parse_record`` turns a raw LLaVA dict into a :class:`Record` and raises :class:`RecordError`
for every schema fault. It never drops or edits a turn: cleaning (dropping a leading assistant
turn of raw ShareGPT data, for example) is a converter's job, where it can be logged.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ijson

IMAGE_MARKER = "<image>"
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Canonical role -> the ``from`` value written back to chat.json.
_ROLE_TO_LLAVA = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation; ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One training sample in canonical form."""

    id: str
    images: tuple[str, ...]
    turns: tuple[Turn, ...]
    source: str = ""


class RecordError(ValueError):
    """A record (or a whole file) does not fit the schema.

    The message names the file, the record id (or its index when there is no id) and the problem;
    ``kind`` is a short machine-readable category used by the validator's report.
    """

    def __init__(
        self,
        problem: str,
        *,
        kind: str,
        record_id: str | None = None,
        source: str = "",
        index: int | None = None,
    ) -> None:
        self.problem = problem
        self.kind = kind
        self.record_id = record_id
        self.source = source
        self.index = index
        where = []
        if source:
            where.append(str(source))
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if index is not None:
            where.append(f"index {index}")
        prefix = ", ".join(where) if where else "record"
        super().__init__(f"{prefix}: {problem} [{kind}]")


_CHUNK = 1 << 16  # bytes per read of a record file

# Receives the error of one unreadable record slot (see iter_raw_records).
OnError = Callable[[RecordError], None]


def _parse_id(raw: dict, err: Any) -> str:
    if "id" not in raw:
        raise err("no 'id' key", "missing_field")
    value = raw["id"]
    # bool is an int subclass; a JSON true/false id is a mistake, not an id.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise err(f"'id' must be a string or an integer, got {type(value).__name__}", "bad_type")
    text = str(value)
    if not text.strip():
        raise err("'id' is empty", "bad_type")
    return text


def _parse_images(raw: dict, err: Any) -> tuple[str, ...]:
    if "image" not in raw:
        return ()
    value = raw["image"]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths:
        raise err("'image' must be a string or a non-empty list of strings", "bad_type")
    for path in paths:
        if not isinstance(path, str) or not path.strip():
            raise err(f"'image' holds {path!r}, not a non-empty path string", "bad_type")
    return tuple(paths)


def _parse_turns(raw: dict, err: Any) -> list[Turn]:
    turns: list[Turn] = []
    system = raw.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise err("top-level 'system' must be a string", "bad_type")
        # An empty top-level system string (LLaMA-Factory writes "") means "no system prompt".
        if system.strip():
            turns.append(Turn("system", system))
    if "conversations" not in raw:
        raise err("no 'conversations' key", "missing_field")
    conversations = raw["conversations"]
    if not isinstance(conversations, list):
        raise err("'conversations' must be a list", "bad_type")
    if not conversations:
        raise err("'conversations' is empty", "no_assistant_turn")
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise err(f"turn {position} is not an object", "bad_type")
        for key in ("from", "value"):
            if key not in turn:
                raise err(f"turn {position} has no {key!r} key", "missing_field")
        role = ROLE_ALIASES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            allowed = ", ".join(sorted(ROLE_ALIASES))
            raise err(
                f"turn {position} has role {turn['from']!r}; allowed: {allowed}", "unknown_role"
            )
        value = turn["value"]
        if not isinstance(value, str):
            raise err(f"turn {position} value is {type(value).__name__}, not a string", "bad_type")
        if not value.strip():
            raise err(f"turn {position} ({turn['from']}) is empty", "empty_turn")
        turns.append(Turn(role, value))
    return turns


def _check_order(turns: list[Turn], err: Any) -> None:
    body = turns[1:] if turns[0].role == "system" else turns
    if any(t.role == "system" for t in body):
        raise err("a system turn may only come first (one per record)", "not_alternating")
    if not any(t.role == "assistant" for t in body):
        raise err("the record has no assistant turn", "no_assistant_turn")
    for position, turn in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if turn.role != expected:
            raise err(
                f"conversation turn {position} is from {turn.role}, expected {expected} "
                "(turns must start with user and alternate)",
                "not_alternating",
            )
    if body[-1].role != "assistant":
        raise err("the last turn is from user; it must be an assistant turn", "trailing_user_turn")


def _check_markers(turns: list[Turn], images: tuple[str, ...], err: Any) -> None:
    for position, turn in enumerate(turns):
        if turn.role != "user" and IMAGE_MARKER in turn.content:
            kind = (
                "image_marker_in_answer" if turn.role == "assistant" else "image_marker_in_system"
            )
            raise err(f"turn {position} ({turn.role}) contains {IMAGE_MARKER}", kind)
    count = sum(t.content.count(IMAGE_MARKER) for t in turns if t.role == "user")
    if count != len(images):
        raise err(
            f"{count} {IMAGE_MARKER} marker(s) in user turns but {len(images)} image(s)",
            "image_count_mismatch",
        )


def parse_record(raw: dict, *, source: str = "", index: int | None = None) -> Record:
    """Check one raw LLaVA ``chat.json`` record and return it as a :class:`Record`."""
    record_id: str | None = None

    def err(problem: str, kind: str) -> RecordError:
        return RecordError(problem, kind=kind, record_id=record_id, source=source, index=index)

    if not isinstance(raw, dict):
        raise err(f"record is {type(raw).__name__}, not an object", "bad_type")
    record_id = _parse_id(raw, err)  # err reads it, so every later error names the id
    images = _parse_images(raw, err)
    turns = _parse_turns(raw, err)
    _check_order(turns, err)
    _check_markers(turns, images, err)
    return Record(id=record_id, images=images, turns=tuple(turns), source=str(source))


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


def _parse_line(line: bytes, line_number: int, source: str, index: int) -> dict:
    """One JSONL line as a dict, or a RecordError naming the line (the caller decides)."""
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

    def __init__(self, file: Any, slow_from: int | None = None) -> None:
        self.file = file
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
        self.chunk_start = self.position
        self.position += len(data)
        self.at_end = not data
        return data


def _skip_bom(file: Any) -> None:
    if file.read(3) != b"\xef\xbb\xbf":
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

    One pass of the C parser that builds no objects: a JSON list that breaks anywhere is refused
    before any of its records is yielded, as when the file was parsed whole.
    """
    with path.open("rb") as file:
        _skip_bom(file)
        reader = _Reader(file)
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


def record_to_json(record: Record) -> dict:
    """Return the canonical LLaVA dict for ``record``; ``parse_record`` reads it back unchanged."""
    out: dict[str, Any] = {"id": record.id}
    if len(record.images) == 1:
        out["image"] = record.images[0]
    elif record.images:
        out["image"] = list(record.images)
    out["conversations"] = [
        {"from": _ROLE_TO_LLAVA[turn.role], "value": turn.content} for turn in record.turns
    ]
    return out


def confined_image_path(folder: str | Path, name: str, *, allow_outside: bool = False) -> Path:
    """``folder/name``, refusing absolute paths and ``..`` escapes unless ``allow_outside``.

    Symbolic links inside the folder are followed as usual (image folders are often links to a
    shared disk); only the path as written must stay inside. Raises RecordError kind
    ``image_outside_folder``; the caller adds the record id.
    """
    folder = Path(folder)
    joined = Path(os.path.normpath(folder / name))
    root = Path(os.path.abspath(folder))
    inside = not Path(name).is_absolute() and root in Path(os.path.abspath(joined)).parents
    if not inside and not allow_outside:
        raise RecordError(
            f"image path {name!r} leaves the image folder {folder} (absolute or '..'); "
            "pass --allow_outside_image_folder to allow it",
            kind="image_outside_folder",
        )
    return joined
