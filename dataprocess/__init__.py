"""Raw corpora -> canonical records in the LLaVA ``chat.json`` schema (no torch needed).

Entry point: ``python -m dataprocess {build,validate,stats,images,features}``; see
``dataprocess/README.md`` (``stats`` and ``features`` import torch; the rest never does).
The record schema lives in :mod:`dataprocess.schema`.
"""

from dataprocess.schema import (
    IMAGE_MARKER,
    ROLE_ALIASES,
    Record,
    RecordError,
    Turn,
    iter_raw_records,
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
