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
* `layout="small"` draws 8-30 objects of 6-16 px per image in heavy clutter of the same size (a set where
  a detector's scores sit low and a fixed score cut keeps few boxes); "standard" is the description above.

The classes and their outlines are in `synth_shapes`, the drawing of one image and the layout
constants (`MAX_COVER`, `MIN_INSIDE`, `EMPTY_FRACTION`, ...) in `synth_scene`; this module writes the
splits' images and COCO files.

Every image is rendered from its own RNG, seeded by (seed, image index), so the output is
byte-identical for a given seed whatever the number of worker processes. Images are 8-bit RGB PNG
files written by PIL at zlib level 1 (fast, and deterministic for the same pixels).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import time
from pathlib import Path

import numpy as np

from pipeline.data.synth_scene import LAYOUTS, render
from pipeline.data.synth_shapes import CLASS_NAMES, CLASS_WEIGHTS, Polygon, bounding_box, polygon_area
from pipeline.errors import InputError
from pipeline.machine import usable_cores
from pipeline.paths import writable_dir

__all__ = ["CLASS_NAMES", "CLASS_WEIGHTS", "generate"]


def _annotation(ann_id: int, image_id: int, category: int, poly: Polygon, masks: bool) -> dict:
    x0, y0, x1, y1 = bounding_box(poly)
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": round(polygon_area(poly), 2),
        "iscrowd": 0,
    }
    if masks:
        ann["segmentation"] = [[round(v, 2) for v in poly.reshape(-1).tolist()]]
    return ann


def _write_split(
    split_dir: Path,
    seed: int,
    first_index: int,
    count: int,
    masks: bool,
    pool: multiprocessing.pool.Pool | None,
    layout: str,
) -> dict:
    """Render `count` images (global indices from `first_index`) and write the split's COCO file."""
    (split_dir / "images").mkdir(parents=True)
    names = [f"{i:06d}.png" for i in range(1, count + 1)]
    tasks = [(seed, first_index + i, split_dir / "images" / name, layout) for i, name in enumerate(names)]
    results = pool.imap(render, tasks, chunksize=16) if pool else map(render, tasks)
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


def _check_args(out: Path, num_images: int, seed: int, val_fraction: float, layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
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
    layout: str = "standard",
) -> dict:
    """Write OUT/train and OUT/val COCO data sets (images/*.png + annotations.json); return a summary.

    `num_images` is the total; val gets max(1, round(num_images * val_fraction)). `workers` (default:
    up to the CPU count, 1 for small runs) only changes the speed, never the output. The summary's
    `layout` names the scene layout (`synth_scene.LAYOUTS`). `class_histogram` counts train annotations; `empty_images` counts images without objects in both splits.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    _check_args(out, num_images, seed, val_fraction, layout)
    n_val = min(max(1, round(num_images * val_fraction)), num_images - 1)
    n_train = num_images - n_val
    if workers is None:
        workers = min(usable_cores(), max(1, num_images // 100))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        train = _write_split(out / "train", seed, 0, n_train, masks, pool, layout)
        val = _write_split(out / "val", seed, n_train, n_val, masks, pool, layout)
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
