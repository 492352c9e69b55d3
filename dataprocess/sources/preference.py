"""Converters for the public preference sets: each row becomes one preference record (DPO).

A preference record is the LLaVA record with ``chosen`` and ``rejected`` answers to its last user
turn (``dataprocess.schema``). The sets, as published (JSON list or JSON lines, one row each):

``rlaif_v`` (openbmb/RLAIF-V-Dataset): ``idx``, ``image`` (a path, or the parquet export's
``{"path": ..., "bytes": ...}``; ``image_path`` is read when ``image`` holds no path),
``question``, ``chosen``, ``rejected``. One image, one question, one pair per row.

``vlfeedback`` (MMInstruction/VLFeedback, ``vlfeedback_80k.jsonl``): ``id``, ``prompt``,
``img_path`` and ``completions``, a list of ``{"model", "response", "annotations"}`` where each
of the aspects Helpfulness, Visual Faithfulness and Ethical Considerations has a ``Rating``
("1".."5"). Pair rule: a completion's score is the mean of its numeric ratings (a completion
with none is left out, logged); the best-scored completion is ``chosen`` and the worst
``rejected`` (the first in file order wins a tie), one pair per prompt; a prompt whose best and
worst score tie, or with fewer than two scored completions, gives no pair (an error, counted).

``llava_rlhf`` (zhiqings/LLaVA-Human-Preference-10K, ``llava_7b_v1_preference.json``): ``id``,
``image``, ``conversations`` (the dialogue, ending with the user turn being answered),
``output_1`` / ``output_2`` (``{"from", "value"}`` or a string) and ``preference`` (1 or 2, the
better output).

Prompts without an ``<image>`` marker get one in front (``<image>\\n``), as LLaVA renders them.
Every fault (a missing key, an unknown preference, an identical pair) is an error in the tally
naming the row; the schema's own checks (``parse_record``) then run on the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import IMAGE_MARKER, Record, RecordError, parse_record
from dataprocess.sources.common import iter_file

VLFEEDBACK_ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def _with_marker(prompt: Any) -> Any:
    """LLaVA's rendering of a one-image prompt: the marker first, unless the text has one."""
    if not isinstance(prompt, str) or IMAGE_MARKER in prompt:
        return prompt
    return f"{IMAGE_MARKER}\n{prompt}"


def _single_turn(row_id: Any, image: Any, prompt: Any, chosen: Any, rejected: Any) -> dict:
    return {
        "id": row_id,
        "image": image,
        "conversations": [{"from": "human", "value": _with_marker(prompt)}],
        "chosen": chosen,
        "rejected": rejected,
    }


def _row_errors(raw: Any, path: str, index: int):
    """`err(problem, kind)` for one row: a RecordError naming the row's id, file and index."""
    row_id = raw.get("id", raw.get("idx")) if isinstance(raw, dict) else None
    row_id = None if row_id is None else str(row_id)

    def err(problem: str, kind: str) -> RecordError:
        return RecordError(problem, kind=kind, record_id=row_id, source=path, index=index)

    return err


def _convert(source: SourceConfig, tally: Tally, to_llava) -> Iterator[Record]:
    """Run `to_llava(raw, err, tally)` on every row, then the schema; faults are tallied, named."""
    for path in source.paths:
        for index, raw in iter_file(path, tally):
            err = _row_errors(raw, str(path), index)
            try:
                if not isinstance(raw, dict):
                    raise err(f"row is {type(raw).__name__}, not an object", "bad_type")
                yield parse_record(to_llava(raw, err, tally), source=str(path), index=index)
            except RecordError as exc:
                tally.error(exc)


def _require(raw: dict, keys: tuple[str, ...], err) -> None:
    for key in keys:
        if key not in raw:
            raise err(f"no {key!r} key", "missing_field")


def _rlaif_v_row(raw: dict, err, _tally: Tally) -> dict:
    _require(raw, ("idx", "question", "chosen", "rejected"), err)
    image = raw.get("image")
    if isinstance(image, dict):  # the parquet export: {"path": ..., "bytes": ...}
        image = image.get("path")
    image = image or raw.get("image_path")
    if not image:
        raise err("no image path in 'image' or 'image_path'", "missing_field")
    return _single_turn(raw["idx"], image, raw["question"], raw["chosen"], raw["rejected"])


def convert_rlaif_v(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """RLAIF-V rows (idx, image, question, chosen, rejected) -> preference records."""
    return _convert(source, tally, _rlaif_v_row)


def _vlfeedback_score(completion: Any) -> float | None:
    """Mean of a completion's numeric aspect ratings, None when it has none."""
    annotations = completion.get("annotations") if isinstance(completion, dict) else None
    ratings = []
    for aspect in VLFEEDBACK_ASPECTS:
        entry = annotations.get(aspect) if isinstance(annotations, dict) else None
        rating = entry.get("Rating") if isinstance(entry, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):  # "N/A" or missing: that aspect does not count
            continue
    return sum(ratings) / len(ratings) if ratings else None


def _vlfeedback_row(raw: dict, err, tally: Tally) -> dict:
    _require(raw, ("id", "prompt", "img_path", "completions"), err)
    completions = raw["completions"]
    if not isinstance(completions, list):
        raise err("'completions' must be a list", "bad_type")
    scored = [(_vlfeedback_score(c), c) for c in completions]
    unscored = sum(score is None for score, _ in scored)
    if unscored:
        note = err(f"{unscored} completion(s) without a numeric rating left out", "")
        tally.change("unrated_completion", note.record_id, note.source, note.problem)
    scored = [(score, c) for score, c in scored if score is not None]
    if len(scored) < 2:
        raise err(f"{len(scored)} rated completion(s); a pair needs two", "no_pair")
    best = max(scored, key=lambda item: item[0])  # max/min keep the first of equals
    worst = min(scored, key=lambda item: item[0])
    if best[0] == worst[0]:
        raise err(f"every rated completion scores {best[0]:g}; no preference", "no_pair")
    return _single_turn(
        raw["id"], raw["img_path"], raw["prompt"], best[1].get("response"), worst[1].get("response")
    )


def convert_vlfeedback(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """VLFeedback rows (several rated completions) -> one best-vs-worst preference record each."""
    return _convert(source, tally, _vlfeedback_row)


def _output_text(value: Any) -> Any:
    return value.get("value") if isinstance(value, dict) else value


def _llava_rlhf_row(raw: dict, err, _tally: Tally) -> dict:
    _require(raw, ("id", "conversations", "output_1", "output_2", "preference"), err)
    preference = raw["preference"]
    if preference not in (1, 2) or isinstance(preference, bool):
        raise err(f"'preference' is {preference!r}; expected 1 or 2", "bad_preference")
    outputs = [_output_text(raw["output_1"]), _output_text(raw["output_2"])]
    chosen, rejected = (outputs[0], outputs[1]) if preference == 1 else (outputs[1], outputs[0])
    record = {"id": raw["id"], "conversations": raw["conversations"]}
    if "image" in raw:
        record["image"] = raw["image"]
    return {**record, "chosen": chosen, "rejected": rejected}


def convert_llava_rlhf(source: SourceConfig, tally: Tally) -> Iterator[Record]:
    """LLaVA-RLHF human preference rows (output_1, output_2, preference) -> preference records."""
    return _convert(source, tally, _llava_rlhf_row)
