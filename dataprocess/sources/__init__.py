"""One converter per source format; each yields canonical records with the source's own ids.

The build prefixes ids and image paths afterwards, so converters stay about their format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from dataprocess.config import SourceConfig
from dataprocess.report import Tally
from dataprocess.schema import Record
from dataprocess.sources.captions import convert_aic_captions, convert_coco_captions
from dataprocess.sources.chat import convert_llava, convert_sharegpt
from dataprocess.sources.preference import (
    convert_llava_rlhf,
    convert_rlaif_v,
    convert_vlfeedback,
)
from dataprocess.sources.qwen_vl import convert_qwen_vl

Converter = Callable[[SourceConfig, Tally], Iterator[Record]]


def converter_for(fmt: str) -> Converter:
    """The converter of a config ``format``; config.FORMATS lists the same names."""
    if fmt == "llava":
        return convert_llava
    if fmt == "sharegpt":
        return convert_sharegpt
    if fmt == "qwen_vl":
        return convert_qwen_vl
    if fmt == "aic_captions":
        return convert_aic_captions
    if fmt == "coco_captions":
        return convert_coco_captions
    if fmt == "rlaif_v":
        return convert_rlaif_v
    if fmt == "vlfeedback":
        return convert_vlfeedback
    if fmt == "llava_rlhf":
        return convert_llava_rlhf
    raise ValueError(f"unknown source format {fmt!r}")
