"""Synthetic, long-tailed shape-detection data sets in COCO format (`ssod synth`).

Each image is a textured background (two-colour gradient, large low-contrast blobs and lines,
colour noise) with 0-8 annotated objects and several un-annotated distractors.

* Classes (`CLASS_NAMES`, category ids 1..K in that order) differ by shape only: every object gets
  a colour drawn independently of its class, a random size (longest side 8-60 px, log-uniform),
  a random aspect stretch, rotation and small vertex jitter.
* Class frequency is Zipf-like (`CLASS_WEIGHTS`, weight 1/rank**1.4): most common / rarest ~18x.
* Distractors (never annotated) are shapes outside the class list: jagged irregular polygons,
  open arcs, line segments and dots of at most 5 px. Some are drawn under the objects, some on
  top of them (partial occlusion). Objects may also overlap each other: a later object may cover
  at most `MAX_COVER` of an earlier object's box.
* Annotations are amodal: `bbox`, `area` and `segmentation` describe an object's full shape
  (clipped to the image), also where a later object or a distractor hides part of it.
  `area` is always the polygon area; `segmentation` (one polygon) is written only when masks=True.
  An object with less than `MIN_INSIDE` of its area inside the image is not drawn at all.
* About `EMPTY_FRACTION` of the images have no object at all.

Every image is rendered from its own RNG, seeded by (seed, image index), so the output is
byte-identical for a given seed whatever the number of worker processes. Images are 8-bit RGB PNG
files written by a small built-in encoder (faster than PIL's here, and equally deterministic).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.pool
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import InputError
from pipeline.paths import writable_dir

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "arrow",
    "crescent",
)
# Relative sampling weight of each class (same order as CLASS_NAMES): Zipf with exponent 1.4,
# so "circle" is 8**1.4 ~ 18x as frequent as "crescent".
CLASS_WEIGHTS: tuple[float, ...] = tuple(1.0 / (rank**1.4) for rank in range(1, len(CLASS_NAMES) + 1))

IMAGE_SIDE = (160, 256)  # inclusive range of image width and height, px
OBJECT_SIDE = (8.0, 60.0)  # range of an object's longest side, px
MAX_OBJECTS = 8
EMPTY_FRACTION = 0.07
MAX_COVER = 0.35  # most of an earlier object's box a later object may cover
MIN_INSIDE = 0.6  # least share of an object's area that must lie inside the image
PLACEMENT_TRIES = 12

Polygon = np.ndarray  # (N, 2) float array of x, y vertices
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _circle(
    n: int, cx: float = 0.0, cy: float = 0.0, r: float = 1.0, start: float = 0.0, stop: float = 2 * math.pi
) -> Polygon:
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi - 1e-9)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _crescent(rng: np.random.Generator) -> Polygon:
    """Unit disc minus a disc of radius r shifted right by d: outer arc, then inner arc back."""
    d, r = rng.uniform(0.4, 0.6), rng.uniform(0.85, 0.95)
    x = (1 - r * r + d * d) / (2 * d)  # x of the two circle intersections
    outer = math.atan2(math.sqrt(1 - x * x), x)
    inner = math.atan2(math.sqrt(1 - x * x), x - d)
    return np.concatenate(
        [
            _circle(16, start=outer, stop=2 * math.pi - outer),
            _circle(12, d, 0.0, r, start=2 * math.pi - inner, stop=inner),
        ]
    )


def _unit_shape(name: str, rng: np.random.Generator) -> Polygon:
    """The outline of one class in unit coordinates (about [-1, 1]), with per-instance variation."""
    if name == "circle":
        return _circle(32)
    if name == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    if name == "triangle":
        return np.array([(rng.uniform(-0.4, 0.4), -1), (1, 1), (-1, 1)], dtype=float)
    if name == "star":
        radii = np.tile([1.0, rng.uniform(0.38, 0.5)], 5)
        return _circle(10, start=-math.pi / 2, stop=1.5 * math.pi) * radii[:, None]
    if name == "cross":
        t = rng.uniform(0.25, 0.4)
        return np.array(
            [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        )
    if name == "hexagon":
        return _circle(6)
    if name == "arrow":
        t, hw, xb = rng.uniform(0.15, 0.25), rng.uniform(0.55, 0.8), 1 - rng.uniform(0.7, 1.0)
        return np.array([(-1, -t), (xb, -t), (xb, -hw), (1, 0), (xb, hw), (xb, t), (-1, t)])
    if name == "crescent":
        return _crescent(rng)
    raise ValueError(f"unknown class {name!r}")


def _pose(unit: Polygon, rng: np.random.Generator, side: float) -> Polygon:
    """Jitter, stretch and rotate a unit shape, then scale it so its longest box side is `side`."""
    pts = unit + rng.uniform(-0.03, 0.03, unit.shape)
    pts = pts * np.array([math.exp(rng.uniform(-0.29, 0.29)), 1.0])  # aspect 0.75..1.33
    a = rng.uniform(0, 2 * math.pi)
    pts = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2
    return pts * (side / np.ptp(pts, axis=0).max())


def _clip_edge(poly: list[tuple[float, float]], axis: int, limit: float, keep_below: bool) -> list[tuple[float, float]]:
    """One Sutherland-Hodgman step: keep the part of `poly` on one side of x (or y) = limit."""

    def inside(p: tuple[float, float]) -> bool:
        return p[axis] <= limit if keep_below else p[axis] >= limit

    out: list[tuple[float, float]] = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        if inside(cur) != inside(prev):
            f = (limit - prev[axis]) / (cur[axis] - prev[axis])
            cross = (prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1]))
            out.append(cross)
        if inside(cur):
            out.append(cur)
    return out


def _clip_to_image(poly: Polygon, width: int, height: int) -> Polygon:
    pts = [tuple(p) for p in poly.tolist()]
    for axis, limit, below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        pts = _clip_edge(pts, axis, float(limit), below)
        if not pts:
            break
    return np.array(pts, dtype=float).reshape(-1, 2)


def _area(poly: Polygon) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0])) / 2


def _box(poly: Polygon) -> Box:
    (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def _cover(earlier: Box, later: Box) -> float:
    """Share of the `earlier` box that the `later` box covers."""
    w = min(earlier[2], later[2]) - max(earlier[0], later[0])
    h = min(earlier[3], later[3]) - max(earlier[1], later[1])
    area = (earlier[2] - earlier[0]) * (earlier[3] - earlier[1])
    return max(w, 0.0) * max(h, 0.0) / max(area, 1e-6)


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
        blob = np.array([cx, cy]) + _circle(12) * r * rng.uniform(0.6, 1.0, (12, 1))
        draw.polygon([tuple(p) for p in blob.tolist()], fill=tint)
    for _ in range(int(rng.integers(0, 4))):
        tint = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in base)
        draw.line(rng.uniform(0, max(width, height), 4).tolist(), fill=tint, width=int(rng.integers(1, 4)))
    return img


def _distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """One never-annotated shape outside the class list: jagged polygon, arc, segment or dot."""
    kind = rng.choice(["polygon", "arc", "line", "dot"], p=[0.35, 0.25, 0.25, 0.15])
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    color = _color(rng)
    if kind == "polygon":
        n = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.3, 1.0, n) * rng.uniform(5, 28)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=color)
    elif kind == "arc":
        r = rng.uniform(5, 30)
        start = rng.uniform(0, 360)
        draw.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start,
            start + rng.uniform(60, 240),
            fill=color,
            width=int(rng.integers(1, 4)),
        )
    elif kind == "line":
        length, a = rng.uniform(10, 80), rng.uniform(0, 2 * math.pi)
        end = (cx + length * math.cos(a), cy + length * math.sin(a))
        draw.line([(cx, cy), end], fill=color, width=int(rng.integers(1, 4)))
    else:
        r = rng.uniform(1.0, 2.5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _place(
    rng: np.random.Generator, name: str, width: int, height: int, boxes: list[Box]
) -> tuple[Polygon, Polygon] | None:
    """Pose one object: (full polygon, polygon clipped to the image), or None if it did not fit."""
    side = math.exp(rng.uniform(math.log(OBJECT_SIDE[0]), math.log(OBJECT_SIDE[1])))
    shape = _pose(_unit_shape(name, rng), rng, side)
    for _ in range(PLACEMENT_TRIES):
        poly = np.round(shape + (rng.uniform(0, width), rng.uniform(0, height)), 2)
        clipped = np.round(_clip_to_image(poly, width, height), 2)
        if _area(clipped) < MIN_INSIDE * _area(poly):
            continue
        box = _box(clipped)
        if all(_cover(old, box) <= MAX_COVER for old in boxes):
            return poly, clipped
    return None


def _draw_objects(img: Image.Image, rng: np.random.Generator) -> list[tuple[int, Polygon]]:
    """Draw 0-8 objects (later ones on top); return [(category id, polygon clipped to the image)]."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    probs = np.array(CLASS_WEIGHTS) / sum(CLASS_WEIGHTS)
    objects: list[tuple[int, Polygon]] = []
    for cls in rng.choice(len(CLASS_NAMES), size=count, p=probs).tolist():
        placed = _place(rng, CLASS_NAMES[cls], width, height, [_box(p) for _, p in objects])
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


def _render(task: tuple[int, int, Path]) -> tuple[int, int, list[tuple[int, Polygon]]]:
    """Draw image `index` of data set `seed` to `path`; return width, height, [(class, polygon)]."""
    seed, index, path = task
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, 2))
    img = _background(rng, width, height)
    for _ in range(int(rng.integers(2, 7))):
        _distractor(ImageDraw.Draw(img), rng, width, height)
    objects = _draw_objects(img, rng)
    for _ in range(int(rng.integers(0, 4))):
        _distractor(ImageDraw.Draw(img), rng, width, height)
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


def _annotation(ann_id: int, image_id: int, category: int, poly: Polygon, masks: bool) -> dict:
    x0, y0, x1, y1 = _box(poly)
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": round(_area(poly), 2),
        "iscrowd": 0,
    }
    if masks:
        ann["segmentation"] = [[round(v, 2) for v in poly.reshape(-1).tolist()]]
    return ann


def _write_split(
    split_dir: Path, seed: int, first_index: int, count: int, masks: bool, pool: multiprocessing.pool.Pool | None
) -> dict:
    """Render `count` images (global indices from `first_index`) and write the split's COCO file."""
    (split_dir / "images").mkdir(parents=True)
    names = [f"{i:06d}.png" for i in range(1, count + 1)]
    tasks = [(seed, first_index + i, split_dir / "images" / name) for i, name in enumerate(names)]
    results = pool.imap(_render, tasks, chunksize=16) if pool else map(_render, tasks)
    coco: dict = {
        "info": {"description": f"ssod synthetic shapes, seed {seed}"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)],
    }
    for image_id, (name, (width, height, objects)) in enumerate(zip(names, results), start=1):
        coco["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category, poly in objects:
            ann_id = len(coco["annotations"]) + 1
            coco["annotations"].append(_annotation(ann_id, image_id, category, poly, masks))
    (split_dir / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
    return coco


def _check_args(out: Path, num_images: int, seed: int, val_fraction: float) -> None:
    if num_images < 2:
        raise InputError(f"--images must be at least 2 (one train and one val image), got {num_images}")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    for split in ("train", "val"):
        if (out / split).exists():
            raise InputError(f"{out / split} already exists; choose a new output directory")
    writable_dir(out, "the synth output directory")


def generate(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    masks: bool = False,
    val_fraction: float = 0.2,
    workers: int | None = None,
) -> dict:
    """Write OUT/train and OUT/val COCO data sets (images/*.png + annotations.json); return a summary.

    `num_images` is the total; val gets max(1, round(num_images * val_fraction)). `workers` (default:
    up to the CPU count, 1 for small runs) only changes the speed, never the output. The summary's
    `class_histogram` counts train annotations; `empty_images` counts images without objects in both splits.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    _check_args(out, num_images, seed, val_fraction)
    n_val = min(max(1, round(num_images * val_fraction)), num_images - 1)
    n_train = num_images - n_val
    if workers is None:
        workers = min(os.cpu_count() or 1, max(1, num_images // 100))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        train = _write_split(out / "train", seed, 0, n_train, masks, pool)
        val = _write_split(out / "val", seed, n_train, n_val, masks, pool)
    finally:
        if pool:
            pool.close()
            pool.join()
    counts = np.bincount([a["category_id"] for a in train["annotations"]], minlength=len(CLASS_NAMES) + 1)
    with_objects = {a["image_id"] for a in train["annotations"]}, {a["image_id"] for a in val["annotations"]}
    return {
        "train_images": n_train,
        "val_images": n_val,
        "train_annotations": len(train["annotations"]),
        "val_annotations": len(val["annotations"]),
        "class_histogram": {name: int(counts[i + 1]) for i, name in enumerate(CLASS_NAMES)},
        "empty_images": num_images - len(with_objects[0]) - len(with_objects[1]),
        "seconds": round(time.perf_counter() - start, 3),
    }
