"""Records parked on disk while ``build`` samples and shuffles them: one owner for the spool file.

A spool is an anonymous temporary file (``tempfile.TemporaryFile``: unlinked at once, so nothing
is left behind however the build ends, even killed) holding one JSON line per record. Appending
returns the byte offset of each record; the build keeps only those offsets (8 bytes per record,
in an ``array('q')``) to sample, rename and shuffle, and reads the records back by offset.
"""

from __future__ import annotations

import json
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path

from dataprocess.schema import Record, Turn

# Reads a single JSON value out of a longer string (the id at the start of a spool line).
_DECODER = json.JSONDecoder()


def _encode(record: Record) -> bytes:
    # The id comes first, so read_id can stop after it; JSON escapes newlines, one record a line.
    turns = [[turn.role, turn.content] for turn in record.turns]
    data = [record.id, list(record.images), turns, record.source, record.chosen, record.rejected]
    return json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n"


def _decode(line: bytes) -> Record:
    record_id, images, turns, source, chosen, rejected = json.loads(line)
    turns = tuple(Turn(r, c) for r, c in turns)
    return Record(record_id, tuple(images), turns, source, chosen, rejected)


class RecordSpool:
    """Append records, get their offsets; read them back by offset. Use as a context manager."""

    def __init__(self, folder: Path) -> None:
        # The build passes the output's folder: that disk must hold the output anyway, while
        # /tmp may be a small RAM disk. Closed by __exit__.
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".spool-")  # noqa: SIM115
        self._end = 0

    @property
    def size(self) -> int:
        """Bytes written so far: the offset the next record gets."""
        return self._end

    def __enter__(self) -> RecordSpool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._file.close()

    def extend(self, records: Iterable[Record]) -> array:
        """Write ``records`` at the end of the spool; their byte offsets, in order."""
        offsets = array("q")
        self._file.seek(self._end)
        for record in records:
            line = _encode(record)
            offsets.append(self._end)
            self._file.write(line)
            self._end += len(line)
        self._file.flush()
        return offsets

    def _line(self, offset: int) -> bytes:
        self._file.seek(offset)
        return self._file.readline()

    def read(self, offset: int) -> Record:
        return _decode(self._line(offset))

    def read_id(self, offset: int) -> str:
        """Only the record's id (decoding the whole record would cost as much as its text)."""
        return _DECODER.raw_decode(self._line(offset).decode("utf-8"), 1)[0]
