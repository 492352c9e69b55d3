"""Raw corpora -> canonical records in the LLaVA ``chat.json`` schema (no torch needed).

Entry point: ``python -m dataprocess {build,validate,stats,images,features}``; see
``dataprocess/README.md`` (``stats``, ``features`` and ``images --vision_model`` import the
model stack inside the command; importing any module of this package never imports torch).
The record schema lives in :mod:`dataprocess.schema`, the reading of record files in
:mod:`dataprocess.reading`.
"""

from dataprocess.reading import iter_raw_records
from dataprocess.schema import (
    IMAGE_MARKER,
    ROLE_ALIASES,
    Record,
    RecordError,
    Turn,
    parse_record,
    record_to_json,
)

__all__ = [
    "IMAGE_MARKER",
    "ROLE_ALIASES",
    "Record",
    "RecordError",
    "Turn",
    "iter_raw_records",
    "parse_record",
    "record_to_json",
]
