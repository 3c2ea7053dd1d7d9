"""One COCO annotation's geometry, checked: its box and its segmentation, as `ssod prepare` keeps them.

A box must be a list of 4 numbers (a string such as "1234" is not read digit by digit); a segmentation
must be a polygon list or an RLE of the image's real size, since the trainer rasterises it at that size.
"""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def clean_box(bbox: Any, width: int, height: int) -> tuple[str, list[float] | None]:
    """COCO xywh -> ("ok" | "clipped", xyxy inside the image) or ("malformed" | "degenerate" | "outside", None)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "malformed", None
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return "degenerate", None
    box = [x, y, x + w, y + h]
    clipped = [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return "outside", None
    return ("clipped" if clipped != box else "ok"), clipped


def valid_segmentation(segmentation: Any, height: int, width: int) -> bool:
    """Polygons (lists of >= 3 finite x, y points) or an RLE dict whose size is [height, width]."""
    if isinstance(segmentation, list):
        return bool(segmentation) and all(_valid_polygon(p) for p in segmentation)
    if not isinstance(segmentation, dict) or list(segmentation.get("size") or []) != [height, width]:
        return False
    counts = segmentation.get("counts")
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    valid_counts = isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)
    return valid_counts and sum(counts) == height * width


def _valid_polygon(polygon: Any) -> bool:
    return (
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(_is_number(v) and math.isfinite(v) for v in polygon)
    )


def _rle_string_counts(text: str) -> list[int] | None:
    """pycocotools' compressed RLE string -> run lengths (its rleFrString), or None when it is not one.

    pycocotools decodes without bounds checks, so runs that overshoot the image must be caught here.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
