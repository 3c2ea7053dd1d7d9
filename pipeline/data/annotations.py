"""One COCO annotation's geometry, checked: its box and its segmentation, as `ssod prepare` keeps them.

A box must be a list of 4 numbers (a string such as "1234" is not read digit by digit); a segmentation
must be a polygon list or an RLE of the image's real size, since the trainer rasterises it at that size.
"""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool; an int too big for a float (JSON allows 1e400 as digits) is not one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def clean_box(bbox: Any, width: int, height: int) -> tuple[str, list[float] | None]:
    """COCO xywh -> ("ok" | "clipped", xyxy inside the image) or ("malformed" | "degenerate" | "outside", None)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "malformed", None
    if not all(_is_number(v) for v in bbox):  # NaN and infinities are numbers, but no extent
        finite_or_not = all(isinstance(v, float) or _is_number(v) for v in bbox)
        return ("degenerate" if finite_or_not else "malformed"), None
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h)) or w <= 0 or h <= 0:
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
    if not isinstance(segmentation, dict) or segmentation.get("size") not in ([height, width], (height, width)):
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
        and all(_is_number(v) for v in polygon)
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
