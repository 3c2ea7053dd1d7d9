"""One synthetic image (`pipeline.data.synth`): background, distractors, posed objects and grain.

`render` draws image `index` of data set `seed` from its own RNG, so an image never depends on which
worker process draws it or in which order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.synth_shapes import (
    CLASS_NAMES,
    CLASS_WEIGHTS,
    Box,
    Polygon,
    bounding_box,
    box_cover,
    circle,
    clip_to_image,
    polygon_area,
    pose,
    unit_shape,
)

IMAGE_SIDE = (160, 256)  # inclusive range of image width and height, px
EMPTY_FRACTION = 0.07
MAX_COVER = 0.35  # most of an earlier object's box a later object may cover
MIN_INSIDE = 0.6  # least share of an object's area that must lie inside the image
PLACEMENT_TRIES = 12


@dataclass(frozen=True)
class Layout:
    """How crowded an image is: object sizes and counts, and the never-annotated clutter around them."""

    object_side: tuple[float, float]  # range of an object's longest side, px (log-uniform)
    objects: tuple[int, int]  # inclusive range of objects per non-empty image
    distractors_under: tuple[int, int]  # clutter drawn before the objects (range, end exclusive)
    distractors_over: tuple[int, int]  # clutter drawn on top of them
    distractor_size: float  # scale of the clutter's polygons, arcs and lines


LAYOUTS = {
    "standard": Layout((8.0, 60.0), (1, 8), (2, 7), (0, 4), 1.0),
    # Many small objects in heavy clutter of the same size: a detector's scores sit low here.
    "small": Layout((6.0, 16.0), (8, 30), (12, 30), (4, 12), 0.4),
}


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = rng.integers(0, 256, 3).tolist()
    return r, g, b


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _visible_color(rng: np.random.Generator, behind: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour (independent of class) with enough luminance contrast to `behind`."""
    best = _color(rng)
    for _ in range(8):
        if abs(_luma(best) - _luma(behind)) >= 40:
            break
        cand = _color(rng)
        if abs(_luma(cand) - _luma(behind)) > abs(_luma(best) - _luma(behind)):
            best = cand
    return best


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Two-colour linear gradient at a random angle plus large low-contrast blobs and lines."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = np.arange(width, dtype=np.float32)[None, :] * math.cos(a) + np.arange(height, dtype=np.float32)[
        :, None
    ] * math.sin(a)
    t -= t.min()
    t *= 255 / max(float(t.max()), 1.0)
    ramp = Image.fromarray(t.astype(np.uint8), "L")
    palette = (c0 + np.linspace(0, 1, 256)[:, None] * (c1 - c0)).astype(np.uint8)  # ramp value -> RGB
    img = Image.merge("RGB", [ramp.point(palette[:, k].tolist()) for k in range(3)])
    draw = ImageDraw.Draw(img)
    base = tuple(int(v) for v in (c0 + c1) / 2)
    for _ in range(int(rng.integers(2, 6))):
        tint = tuple(int(np.clip(v + rng.integers(-22, 23), 0, 255)) for v in base)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 120)
        blob = np.array([cx, cy]) + circle(12) * r * rng.uniform(0.6, 1.0, (12, 1))
        draw.polygon([tuple(p) for p in blob.tolist()], fill=tint)
    for _ in range(int(rng.integers(0, 4))):
        tint = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in base)
        draw.line(rng.uniform(0, max(width, height), 4).tolist(), fill=tint, width=int(rng.integers(1, 4)))
    return img


def _distractor(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, size: float = 1.0
) -> None:
    """One never-annotated shape outside the class list: jagged polygon, arc, segment or dot (`size` scales it)."""
    kind = rng.choice(["polygon", "arc", "line", "dot"], p=[0.35, 0.25, 0.25, 0.15])
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    color = _color(rng)
    if kind == "polygon":
        n = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.3, 1.0, n) * rng.uniform(5, 28) * size
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=color)
    elif kind == "arc":
        r = rng.uniform(5, 30) * size
        start = rng.uniform(0, 360)
        draw.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start,
            start + rng.uniform(60, 240),
            fill=color,
            width=int(rng.integers(1, 4)),
        )
    elif kind == "line":
        length, a = rng.uniform(10, 80) * size, rng.uniform(0, 2 * math.pi)
        end = (cx + length * math.cos(a), cy + length * math.sin(a))
        draw.line([(cx, cy), end], fill=color, width=int(rng.integers(1, 4)))
    else:
        r = rng.uniform(1.0, 2.5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _place(
    rng: np.random.Generator, name: str, width: int, height: int, boxes: list[Box], layout: Layout
) -> tuple[Polygon, Polygon] | None:
    """Pose one object: (full polygon, polygon clipped to the image), or None if it did not fit."""
    low, high = layout.object_side
    side = math.exp(rng.uniform(math.log(low), math.log(high)))
    shape = pose(unit_shape(name, rng), rng, side)
    for _ in range(PLACEMENT_TRIES):
        poly = np.round(shape + (rng.uniform(0, width), rng.uniform(0, height)), 2)
        clipped = np.round(clip_to_image(poly, width, height), 2)
        if polygon_area(clipped) < MIN_INSIDE * polygon_area(poly):
            continue
        box = bounding_box(clipped)
        if all(box_cover(old, box) <= MAX_COVER for old in boxes):
            return poly, clipped
    return None


def _draw_objects(img: Image.Image, rng: np.random.Generator, layout: Layout) -> list[tuple[int, Polygon]]:
    """Draw the layout's objects (later ones on top); return [(category id, polygon clipped to the image)]."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    low, high = layout.objects
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(low, high + 1))
    probs = np.array(CLASS_WEIGHTS) / sum(CLASS_WEIGHTS)
    objects: list[tuple[int, Polygon]] = []
    for cls in rng.choice(len(CLASS_NAMES), size=count, p=probs).tolist():
        placed = _place(rng, CLASS_NAMES[cls], width, height, [bounding_box(p) for _, p in objects], layout)
        if placed is None:
            continue
        poly, clipped = placed
        cx, cy = (int(min(max(v, 0), lim - 1)) for v, lim in zip(clipped.mean(axis=0), (width, height)))
        outline = _color(rng) if rng.random() < 0.3 else None
        draw.polygon(
            [tuple(p) for p in poly.tolist()], fill=_visible_color(rng, img.getpixel((cx, cy))), outline=outline
        )
        objects.append((cls + 1, clipped))
    return objects


def render(task: tuple[int, int, Path, str]) -> tuple[int, int, list[tuple[int, Polygon]]]:
    """Draw image `index` of data set `seed` in the named layout to `path`; return width, height,
    [(class, polygon)]."""
    seed, index, path, layout_name = task
    layout = LAYOUTS[layout_name]
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, 2))
    img = _background(rng, width, height)
    for _ in range(int(rng.integers(*layout.distractors_under))):
        _distractor(ImageDraw.Draw(img), rng, width, height, layout.distractor_size)
    objects = _draw_objects(img, rng, layout)
    for _ in range(int(rng.integers(*layout.distractors_over))):
        _distractor(ImageDraw.Draw(img), rng, width, height, layout.distractor_size)
    # Fast zlib level and PIL's default filters: deterministic bytes for the same pixels.
    Image.fromarray(_add_grain(img, rng)).save(path, format="PNG", compress_level=1)
    return width, height, objects


def _add_grain(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Gaussian colour noise in 2x2 px grains (cheaper to encode than per-pixel noise)."""
    pixels = np.asarray(img).astype(np.int16)
    h, w = pixels.shape[:2]
    grain = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * rng.uniform(3, 12)
    pixels += grain.astype(np.int16).repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
