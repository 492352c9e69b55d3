"""How deep a JSON text nests, measured on its bytes before any parser builds it.

Parsing a record nested 100,000 deep exhausts the stack (`json.loads` raises RecursionError) or
memory (ijson's item prefixes grow with the depth, so quadratically: 23 GB for a 200 KB file).
`NestingScanner` follows the brackets of the raw bytes fed to it, piece by piece, all in C: the
escapes that could hide a quote (backslash pairs, then backslash-quote) are removed with
`bytes.replace`, everything but quotes, brackets and commas is dropped with `bytes.translate`,
and numpy follows string state and depth over the few bytes left. No Python loop runs over bytes
or parse events. A run of backslashes cut by a piece boundary carries over (as its parity), and
so does being inside a string. The commas at depth 1 count the items of a top-level list, so the
item that goes too deep can be named.
"""

from __future__ import annotations

import numpy as np

_NOT_KEPT = bytes(b for b in range(256) if b not in b'"[]{},')
_STEP = np.zeros(256, dtype=np.int32)  # byte -> depth change
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


class NestingScanner:
    """Feed a JSON text in pieces; `feed` returns the item index (commas at depth 1 so far) where
    the text first goes deeper than `limit`, or None while it stays within it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.depth = 0
        self.index = 0  # commas seen at depth 1: the top-level item being read
        self.in_string = 0
        self.backslash = b""  # an escaping backslash that ended the previous piece

    def feed(self, data: bytes) -> int | None:
        data = self.backslash + data
        run = len(data) - len(data.rstrip(b"\\"))  # the next piece may hold what it escapes
        self.backslash = b"\\" if run % 2 else b""
        if run:
            data = data[:-run]  # the pairs in it are escaped backslashes: nothing to keep
        # Left to right, as JSON pairs them: "\\\\" is two backslashes, then '\\"' a quote.
        kept = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_KEPT)
        if not kept:
            return None
        code = np.frombuffer(kept, dtype=np.uint8)  # quotes, brackets, commas  [n]
        quotes = code == ord('"')
        opened = np.cumsum(quotes, dtype=np.int64) + self.in_string  # quotes so far, carried
        outside = (opened - quotes) % 2 == 0  # not inside a string before this byte
        outside &= ~quotes
        depth = self.depth + np.cumsum(_STEP[code] * outside)  # after each byte
        commas = (code == ord(",")) & outside & (depth == 1)
        too_deep = np.flatnonzero(depth > self.limit)
        if too_deep.size:
            return self.index + int(np.count_nonzero(commas[: too_deep[0]]))
        self.depth = int(depth[-1])
        self.index += int(np.count_nonzero(commas))
        self.in_string = int(opened[-1]) % 2
        return None
