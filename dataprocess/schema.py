"""The canonical record: one owner for the LLaVA ``chat.json`` schema used across the project.

A record is an id, the images it shows (paths relative to an image folder) and its turns: an
optional leading system turn, then user/assistant alternating, ending with an assistant turn.
Every ``<image>`` marker sits in a user turn, one per image, in order.

A preference record (for DPO) has the same keys plus ``chosen`` and ``rejected``, two answer
strings to the prompt; its ``conversations`` end with the user turn they answer (earlier turns
are history). The two answers must be non-empty, differ, and hold no ``<image>``.

``parse_record`` turns a raw LLaVA dict into a :class:`Record` and raises :class:`RecordError`
for every schema fault. It never drops or edits a turn: cleaning (dropping a leading assistant
turn of raw ShareGPT data, for example) is a converter's job, where it can be logged.
Reading record files into raw dicts is :mod:`dataprocess.reading`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # A preference record's two answers to its last (user) turn; None for a training record
    chosen: str | None = None
    rejected: str | None = None

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None


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


def _check_order(turns: list[Turn], err: Any, preference: bool = False) -> None:
    body = turns[1:] if turns[0].role == "system" else turns
    if any(t.role == "system" for t in body):
        raise err("a system turn may only come first (one per record)", "not_alternating")
    if preference:
        if not body:
            raise err("'conversations' holds no user turn", "no_user_turn")
        _check_alternating(body, err)
        if body[-1].role != "user":
            raise err(
                "the prompt ends with an assistant turn; a preference record's conversations "
                "must end with the user turn that 'chosen' and 'rejected' answer",
                "trailing_assistant_turn",
            )
        return
    if not any(t.role == "assistant" for t in body):
        raise err("the record has no assistant turn", "no_assistant_turn")
    _check_alternating(body, err)
    if body[-1].role != "assistant":
        raise err("the last turn is from user; it must be an assistant turn", "trailing_user_turn")


def _check_alternating(body: list[Turn], err: Any) -> None:
    for position, turn in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if turn.role != expected:
            raise err(
                f"conversation turn {position} is from {turn.role}, expected {expected} "
                "(turns must start with user and alternate)",
                "not_alternating",
            )


def _parse_answers(raw: dict, err: Any) -> tuple[str, str] | tuple[None, None]:
    """A preference record's (chosen, rejected), or (None, None) for a training record."""
    if "chosen" not in raw and "rejected" not in raw:
        return None, None
    answers = []
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise err(
                f"a preference record needs both 'chosen' and 'rejected'; no {key!r}",
                "missing_field",
            )
        value = raw[key]
        if not isinstance(value, str):
            raise err(f"{key!r} is {type(value).__name__}, not a string", "bad_type")
        if not value.strip():
            raise err(f"{key!r} is empty", "empty_answer")
        if IMAGE_MARKER in value:
            raise err(f"{key!r} contains {IMAGE_MARKER}", "image_marker_in_answer")
        answers.append(value)
    if answers[0].strip() == answers[1].strip():
        raise err("'chosen' and 'rejected' are the same answer", "identical_answers")
    return answers[0], answers[1]


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
    chosen, rejected = _parse_answers(raw, err)
    _check_order(turns, err, preference=chosen is not None)
    _check_markers(turns, images, err)
    return Record(record_id, images, tuple(turns), str(source), chosen, rejected)


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
    if record.is_preference:
        out["chosen"], out["rejected"] = record.chosen, record.rejected
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
