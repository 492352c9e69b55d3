"""Grounding boxes: the three conventions, the one parser of box text, and drawing boxes.

Conventions (``shared/reference/corpus-formats.md`` §7):

- ``qwen``: ``<ref>the dog</ref><box>(x1,y1),(x2,y2)</box>``, integers on a 0-1000 grid (x by
  width, y by height, on the unpadded image), ``0 <= v < 1000``, ``x1 < x2``, ``y1 < y2``. Several
  boxes may follow one ref; a box may stand alone. This grid is the hub: :class:`Box`.
- ``llava``: ``[x1, y1, x2, y2]`` floats in [0, 1] inside the text, on the unpadded image.
  mix665k's VG boxes were reported to use a padded-square frame instead; these functions do not
  undo that padding, so leave such sources in their own format.
- ``coco``: ``[x, y, w, h]`` in pixels, which needs the image size.

Grid -> pixels is ``q / 1000 * side`` (Qwen-VL's drawing helper); pixels -> grid floors, so a box
survives a round trip within one grid unit. Answers of the web chat, ``test.py --draw_boxes`` and
the ``dataprocess`` converters all parse box text here. No torch: PIL only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dataprocess.schema import IMAGE_MARKER, Record, RecordError, confined_image_path

BOX_SCALE = 1000  # Qwen-VL grid: integers in [0, 1000)
BOX_FORMATS = ("keep", "qwen", "llava")  # a build source's `box_format`
TAG_RE = re.compile(r"<ref>(.*?)</ref>|<box>(.*?)</box>", re.DOTALL)
BOX_BODY_RE = re.compile(
    r"^\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$"
)
_UNIT = r"(0(?:\.\d+)?|1(?:\.0+)?|\.\d+)"  # a number in [0, 1] as LLaVA writes it
LLAVA_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_UNIT] * 4) + r"\s*\]")
# Fonts with CJK glyphs, tried in order before PIL's built-in font (which has none).
FONT_FILES = ("NotoSansCJK-Regular.ttc", "wqy-microhei.ttc", "wqy-zenhei.ttc", "DejaVuSans.ttf")
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0))  # fmt: skip


@dataclass(frozen=True)
class Box:
    """A box on the Qwen-VL 0-1000 grid."""

    x1: int
    y1: int
    x2: int
    y2: int

    def problem(self) -> str | None:
        """None for a drawable box, else the validator's error kind."""
        values = (self.x1, self.y1, self.x2, self.y2)
        ok = all(0 <= v < BOX_SCALE for v in values) and self.x1 < self.x2 and self.y1 < self.y2
        return None if ok else "box_out_of_range"

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixels of a `width` x `height` image."""
        return (self.x1 / BOX_SCALE * width, self.y1 / BOX_SCALE * height,
                self.x2 / BOX_SCALE * width, self.y2 / BOX_SCALE * height)  # fmt: skip

    def coords(self) -> str:
        return f"({self.x1},{self.y1}),({self.x2},{self.y2})"

    def text(self) -> str:
        return f"<box>{self.coords()}</box>"


@dataclass(frozen=True)
class BoxSpan:
    """One ``<box>...</box>`` in a text: where, its body, the box (None when malformed), and the
    ``<ref>`` it follows (None for a box after other text). `kind` names a fault."""

    start: int
    end: int
    body: str
    box: Box | None
    ref: str | None
    kind: str | None  # None, "bad_box" (not (x1,y1),(x2,y2)) or "box_out_of_range"

    def message(self) -> str:
        if self.kind == "bad_box":
            return f"box {self.body!r} is not (x1,y1),(x2,y2)"
        if self.kind == "box_out_of_range":
            return f"box {self.body!r} needs 0<=x1<x2<1000, 0<=y1<y2<1000"
        return ""


def parse_boxes(text: str) -> list[BoxSpan]:
    """Every ``<box>`` of `text`, in order. A ``<ref>`` names the boxes right after it (only
    whitespace between); malformed bodies come back with `box` None and a `kind`, never raise."""
    spans: list[BoxSpan] = []
    ref, last_end = None, 0
    for match in TAG_RE.finditer(text):
        if match.group(1) is not None:
            ref, last_end = match.group(1).strip(), match.end()
            continue
        if text[last_end : match.start()].strip():
            ref = None  # other text since the ref (or the previous box): this box stands alone
        body, box, kind = match.group(2), None, "bad_box"
        numbers = BOX_BODY_RE.match(body)
        if numbers:
            box = Box(*(int(v) for v in numbers.groups()))
            kind = box.problem()
        spans.append(BoxSpan(match.start(), match.end(), body, box, ref, kind))
        last_end = match.end()
    return spans


def found_boxes(text: str) -> list[tuple[str | None, Box]]:
    """The drawable boxes of `text` with their ref: Qwen ``<box>`` spans, then LLaVA
    ``[x1, y1, x2, y2]`` boxes (models trained on LLaVA data answer that way)."""
    found = [(span.ref, span.box) for span in parse_boxes(text) if span.kind is None]
    return found + [(None, box) for box in llava_boxes(text) if box.problem() is None]


def label_boxes(found: Sequence[tuple[str | None, Box]], first: int = 1) -> list[tuple[str, Box]]:
    """Labels "k" or "k: ref", k counting from `first`."""
    return [(f"{k}: {ref}" if ref else str(k), box) for k, (ref, box) in enumerate(found, first)]


def labelled_boxes(text: str) -> list[tuple[str, Box]]:
    """The drawable boxes of `text`, labelled for drawing."""
    return label_boxes(found_boxes(text))


def box_legend(text: str) -> list[str]:
    """One line per box of an answer: what was drawn, and each malformed box (shown as text)."""
    lines = [f"{label} {box.coords()}" for label, box in labelled_boxes(text)]
    lines += [f"not drawn: {span.message()}" for span in parse_boxes(text) if span.kind]
    return lines


# --- conversions: Qwen's grid is the hub ---------------------------------------------------------


def _grid(fraction: float) -> int:
    """A fraction of a side -> a grid cell, clipped to [0, 999]; the epsilon absorbs float noise
    (1000 * 0.57 is 569.9999...)."""
    return min(BOX_SCALE - 1, max(0, math.floor(fraction * BOX_SCALE + 1e-6)))


def llava_to_qwen(values: Sequence[float]) -> Box:
    """LLaVA ``[x1, y1, x2, y2]`` fractions -> a grid box."""
    x1, y1, x2, y2 = values
    return Box(_grid(x1), _grid(y1), _grid(x2), _grid(y2))


def qwen_to_llava(box: Box, digits: int = 3) -> list[float]:
    """A grid box -> LLaVA fractions. LLaVA's own data has 2 decimals; 3 keep every grid cell."""
    return [round(v / BOX_SCALE, digits) for v in (box.x1, box.y1, box.x2, box.y2)]


def coco_to_qwen(xywh: Sequence[float], width: int, height: int) -> Box:
    """COCO ``[x, y, w, h]`` pixels of a `width` x `height` image -> a grid box."""
    x, y, w, h = xywh
    return Box(_grid(x / width), _grid(y / height), _grid((x + w) / width), _grid((y + h) / height))


def qwen_to_coco(box: Box, width: int, height: int) -> list[float]:
    """A grid box -> COCO ``[x, y, w, h]`` pixels (2 decimals)."""
    x1, y1, x2, y2 = box.pixels(width, height)
    return [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]


def coco_to_llava(xywh: Sequence[float], width: int, height: int, digits: int = 3) -> list[float]:
    x, y, w, h = xywh
    return [round(v, digits) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]


def llava_to_coco(values: Sequence[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = values
    return [round(v, 2) for v in (x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height)]


def llava_boxes(text: str) -> list[Box]:
    """The LLaVA ``[x1, y1, x2, y2]`` boxes of `text` on the grid (degenerate ones included)."""
    return [llava_to_qwen([float(v) for v in m.groups()]) for m in LLAVA_BOX_RE.finditer(text)]


def format_llava(values: Sequence[float]) -> str:
    """``[0.28, 0.8, 0.48, 0.98]``: LLaVA's spelling, trailing zeros dropped."""
    return "[" + ", ".join(f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in values) + "]"


def convert_box_text(text: str, box_format: str) -> str:
    """Rewrite the boxes of `text` in `box_format` (one of BOX_FORMATS).

    ``qwen``: each LLaVA ``[x1, y1, x2, y2]`` becomes ``<box>(x1,y1),(x2,y2)</box>``. ``llava``:
    each Qwen box becomes ``[x1, y1, x2, y2]`` and ``<ref>x</ref>`` becomes ``x``; a malformed
    ``<box>`` raises ValueError naming it (a converter reports it on the record).
    """
    if box_format == "keep":
        return text
    if box_format == "qwen":
        return LLAVA_BOX_RE.sub(
            lambda m: llava_to_qwen([float(v) for v in m.groups()]).text(), text
        )
    if box_format != "llava":
        raise ValueError(f"box_format {box_format!r}; allowed: {', '.join(BOX_FORMATS)}")
    pieces, position = [], 0
    for span in parse_boxes(text):
        if span.box is None:
            raise ValueError(span.message())
        pieces += [text[position : span.start], format_llava(qwen_to_llava(span.box))]
        position = span.end
    pieces.append(text[position:])
    return re.sub(r"<ref>(.*?)</ref>", r"\1 ", "".join(pieces), flags=re.DOTALL)


# --- drawing -------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def draw_boxes(
    image: Image.Image, boxes: Sequence[tuple[str, Box]], min_side: int = 448
) -> Image.Image:
    """A copy of `image` with every (label, grid box) drawn and labelled. Small images are first
    scaled up (nearest neighbour) so that the short side is at least `min_side`."""
    from visual.image_io import to_rgb  # the one decoder's rules (alpha on white, 16-bit, EXIF)

    picture = to_rgb(image)
    scale = max(1.0, min_side / max(1, min(picture.size)))
    if scale > 1:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = _font(max(12, min(picture.size) // 28))
    line = max(2, min(picture.size) // 150)
    for k, (label, box) in enumerate(boxes):
        color = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = box.pixels(picture.width, picture.height)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        height = bottom - top + 4
        y = y1 - height if y1 - height >= 0 else y1  # above the box, or inside at the top edge
        draw.rectangle((x1, y, x1 + right - left + 6, y + height), fill=color)
        draw.text((x1 + 3 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)
    return picture


def draw_answer_boxes(image: Image.Image, answer: str) -> Image.Image | None:
    """`image` with the boxes of `answer` drawn, or None when the answer has no drawable box."""
    boxes = labelled_boxes(answer)
    return draw_boxes(image, boxes) if boxes else None


def draw_record_boxes(
    record: Record, image_folder: str | Path, *, allow_outside: bool = False
) -> list[tuple[int, Image.Image]]:
    """(image index, drawing) for each image of `record` that its boxes refer to. A box refers
    to the latest image shown up to its turn (Qwen-VL's rule); numbering runs over the record."""
    from visual.image_io import load_image  # the pixels (EXIF orientation) training sees

    per_image: dict[int, list[tuple[str | None, Box]]] = {}
    shown = 0
    for turn in record.turns:
        shown += turn.content.count(IMAGE_MARKER)
        found = found_boxes(turn.content)
        if found and not shown:
            raise RecordError("a box comes before any image", kind="bad_box", record_id=record.id)
        if found:
            per_image.setdefault(shown - 1, []).extend(found)
    drawings, first = [], 1
    for index, found in sorted(per_image.items()):
        path = confined_image_path(image_folder, record.images[index], allow_outside=allow_outside)
        drawings.append((index, draw_boxes(load_image(path), label_boxes(found, first))))
        first += len(found)
    return drawings
