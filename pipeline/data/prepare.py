"""`ssod prepare`: a COCO train set (+ val, + raw unannotated images) -> split.json and Parquet shards.

The labeled set is `percent` % of the train images that keep at least one trainable box after
cleaning, drawn with `seed`; every other usable train image, and every extra raw image, is unlabeled.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import schema
from pipeline.data.coco_io import (
    ImageRecord,
    Report,
    build_records,
    category_table,
    extra_records,
    load_coco,
    map_categories,
    write_json,
)
from pipeline.data.image_files import check_images, encoded_image, image_warnings_held, list_image_files
from pipeline.errors import InputError
from pipeline.paths import output_errors, writable_dir

ROW_GROUP_SIZE = 16
PROBLEMS = (
    "missing_images",
    "corrupt_images",
    "converted_images",
    "size_mismatch_images",
    "dropped_malformed_boxes",
    "dropped_degenerate_boxes",
    "clipped_boxes",
    "dropped_invalid_segmentations",
    "dropped_outside_boxes",
    "unknown_category_annotations",
    "crowd_annotations",
    "duplicate_annotation_ids",
    "orphan_annotations",
    "duplicate_file_names",
    "remapped_val_categories",
    "extra_images_already_listed",
    "image_warnings",
)


@dataclass
class Sources:
    """Cleaned inputs: kept train/val images, kept extra raw images, the train categories."""

    train: list[ImageRecord]
    val: list[ImageRecord] | None
    extras: list[ImageRecord]
    coco_categories: list[dict]  # as in the train file, for the ground-truth COCO files
    categories: list[dict]  # category_table(): id, name, label

    @property
    def label_of(self) -> dict[int, int]:
        return {c["id"]: c["label"] for c in self.categories}


def prepare(
    annotations: str | Path,
    images: str | Path,
    percent: float,
    seed: int,
    out: str | Path,
    val_annotations: str | Path | None = None,
    val_images: str | Path | None = None,
    unlabeled_images: str | Path | None = None,
    shard_rows: int = 256,
) -> dict:
    """Clean, split and shard the inputs into `out`; return (and write) the report."""
    started = time.perf_counter()
    _check_options(percent, shard_rows, val_annotations, val_images)
    out = _check_out(Path(out), keeps_val=val_annotations is not None)
    report = Report()
    sources = read_sources(annotations, images, val_annotations, val_images, unlabeled_images, report)
    candidates = [r.image_id for r in sources.train if r.has_boxes]
    if not candidates:
        raise InputError(f"{annotations}: no image has a usable annotation after cleaning; nothing to label")
    labeled_ids = set(draw_labeled(candidates, percent, seed))
    labeled = [r for r in sources.train if r.image_id in labeled_ids]
    unlabeled = [r for r in sources.train if r.image_id not in labeled_ids] + sources.extras
    splits = {schema.LABELED_DIR: labeled, schema.UNLABELED_DIR: unlabeled, schema.VAL_DIR: sources.val}
    with output_errors(out, "the prepared set"):
        write_outputs(out, splits, sources, percent, seed, shard_rows)
        result = _summary(report, splits, sources, time.perf_counter() - started)
        write_json(out / schema.REPORT_FILE, result)
    return result


def _check_options(percent: float, shard_rows: int, val_annotations: object, val_images: object) -> None:
    if not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        raise InputError(f"--percent must be in (0, 100], got {percent}")
    if shard_rows < 1:
        raise InputError(f"--shard-rows must be at least 1, got {shard_rows}")
    if (val_annotations is None) != (val_images is None):
        raise InputError("--val-annotations and --val-images must be given together")


def _check_out(out: Path, keeps_val: bool) -> Path:
    """Before hours of image decoding: `--out` must be writable, and rewriting a prepared set must not
    silently drop its validation set."""
    if out.is_dir() and any(out.iterdir()) and not (out / schema.SPLIT_FILE).exists():
        raise InputError(f"{out}: --out is a non-empty directory that holds no prepared set; choose a new one")
    if not keeps_val and (out / schema.VAL_GT_FILE).exists():
        raise InputError(
            f"{out}: --out holds a validation set ({schema.VAL_GT_FILE}) that this run would delete; "
            "give --val-annotations and --val-images again, or choose another --out"
        )
    return writable_dir(out, "--out")


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {what} directory not found")
    return path


def read_sources(
    annotations: str | Path,
    images: str | Path,
    val_annotations: str | Path | None,
    val_images: str | Path | None,
    unlabeled_images: str | Path | None,
    report: Report,
) -> Sources:
    """Load, validate and clean every input; all image files are decoded once, in parallel."""
    train_coco = load_coco(annotations)
    images_dir = _existing_dir(images, "images")
    val_coco = load_coco(val_annotations) if val_annotations is not None else None
    if val_coco is not None:  # the train file's categories rule: val's are matched to them by name
        val_coco, remapped = map_categories(val_coco, val_annotations, train_coco["categories"], annotations)
        if remapped:
            report.add("remapped_val_categories", f"{remapped} of {len(val_coco['categories'])}", remapped)
    val_dir = _existing_dir(val_images, "validation images") if val_images is not None else None
    extra_dir = _existing_dir(unlabeled_images, "unlabeled images") if unlabeled_images is not None else None
    extra_paths = list_image_files(extra_dir) if extra_dir is not None else []
    if extra_dir is not None and not extra_paths:
        raise InputError(f"{extra_dir}: --unlabeled-images holds no image files")
    entries = [(images_dir, e) for e in train_coco["images"]]
    entries += [(val_dir, e) for e in val_coco["images"]] if val_coco is not None else []
    extra_paths = _not_listed(extra_dir, extra_paths, entries, report)
    paths = [folder / str(e["file_name"]) for folder, e in entries] + extra_paths
    checks = dict(zip(paths, check_images(paths)))
    categories = train_coco["categories"]
    sources = Sources(train=[], val=None, extras=[], coco_categories=categories, categories=category_table(categories))
    sources.train = build_records(train_coco, images_dir, checks, sources.label_of, report)
    if val_coco is not None:
        sources.val = build_records(val_coco, val_dir, checks, sources.label_of, report)
    if extra_dir is not None:
        first_extra_id = max((e["id"] for _, e in entries), default=0) + 1
        sources.extras = extra_records(extra_dir, extra_paths, checks, first_extra_id, report)
    return sources


def _not_listed(extra_dir: Path | None, paths: list[Path], entries: list, report: Report) -> list[Path]:
    """Extra raw images that are not also a train or val image (a val image in the unlabeled pool leaks it)."""
    if not paths:
        return paths
    listed = {_real(folder / str(e["file_name"])) for folder, e in entries}
    kept = []
    for path in paths:
        if _real(path) in listed:
            report.add("extra_images_already_listed", path.relative_to(extra_dir).as_posix())
        else:
            kept.append(path)
    return kept


def _real(path: Path) -> str | None:
    try:
        return os.path.realpath(path)
    except ValueError:  # a NUL byte in a COCO file_name: no file of this machine
        return None


def draw_labeled(candidates: list[int], percent: float, seed: int) -> list[int]:
    """`percent` % (rounded, at least 1) of the candidate ids; depends only on the id set, percent, seed."""
    ids = np.array(sorted(candidates), dtype=np.int64)
    count = max(1, round(len(ids) * percent / 100))
    chosen = np.random.default_rng(seed).choice(ids, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def write_outputs(
    out: Path, splits: dict[str, list[ImageRecord] | None], sources: Sources, percent: float, seed: int, shard_rows: int
) -> None:
    """split.json, categories.json, the cleaned ground-truth COCO files and the Parquet shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / schema.VAL_GT_FILE).unlink(missing_ok=True)
    split = {
        "percent": percent,
        "seed": seed,
        "labeled": sorted(r.image_id for r in splits[schema.LABELED_DIR]),
        "unlabeled": sorted(r.image_id for r in splits[schema.UNLABELED_DIR]),
        "num_labeled": len(splits[schema.LABELED_DIR]),
        "num_unlabeled": len(splits[schema.UNLABELED_DIR]),
        "num_val": len(sources.val or []),
    }
    write_json(out / schema.SPLIT_FILE, split)
    write_json(out / schema.CATEGORIES_FILE, sources.categories)
    unlabeled_train = [r for r in splits[schema.UNLABELED_DIR] if r.from_coco]
    write_json(out / schema.UNLABELED_GT_FILE, _coco_subset(unlabeled_train, sources.coco_categories))
    if sources.val is not None:
        write_json(out / schema.VAL_GT_FILE, _coco_subset(sources.val, sources.coco_categories))
    label_of = sources.label_of
    with image_warnings_held(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name, records in splits.items():
            for old in (out / name).glob("part-*.parquet"):
                old.unlink()
            if records is not None:
                write_shards(records, out / name, label_of, shard_rows, pool)


def _coco_subset(records: list[ImageRecord], categories: list[dict]) -> dict:
    """Cleaned COCO ground truth of `records` (same image ids, real sizes, clipped boxes, crowd kept)."""
    return {
        "images": [r.entry for r in records],
        "annotations": [a for r in records for a in r.annotations],
        "categories": categories,
    }


def write_shards(
    records: list[ImageRecord],
    split_dir: Path,
    label_of: dict[int, int],
    shard_rows: int,
    pool: ThreadPoolExecutor,
) -> None:
    """part-00000.parquet, ... in image id order: `shard_rows` rows per file, small row groups."""
    split_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: r.image_id)
    shards = [ordered[i : i + shard_rows] for i in range(0, len(ordered), shard_rows)] or [[]]
    for index, shard in enumerate(shards):
        with pq.ParquetWriter(split_dir / f"part-{index:05d}.parquet", schema.ROW_SCHEMA) as writer:
            for start in range(0, len(shard), ROW_GROUP_SIZE):
                rows = list(pool.map(lambda r: to_row(r, label_of), shard[start : start + ROW_GROUP_SIZE]))
                writer.write_table(pa.Table.from_pylist(rows, schema=schema.ROW_SCHEMA))


def to_row(record: ImageRecord, label_of: dict[int, int]) -> dict:
    """One Parquet row: image bytes (converted if needed) + trainable boxes as absolute XYXY."""
    trainable = [a for a in record.annotations if not a.get("iscrowd")]
    return {
        "image_id": record.image_id,
        "file_name": record.file_name,
        "width": record.width,
        "height": record.height,
        "image": encoded_image(record.path, record.convert),
        "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in trainable)],
        "labels": [label_of[a["category_id"]] for a in trainable],
        "segmentations": [json.dumps(a["segmentation"]) if a.get("segmentation") else "" for a in trainable],
        "annotated": record.from_coco,
    }


def _summary(report: Report, splits: dict[str, list[ImageRecord] | None], sources: Sources, seconds: float) -> dict:
    rows = [r for records in splits.values() for r in records or []]
    result: dict = {problem: report.counts[problem] for problem in PROBLEMS}
    result.update(
        labeled=len(splits[schema.LABELED_DIR]),
        unlabeled=len(splits[schema.UNLABELED_DIR]),
        val=len(sources.val or []),
        extra_unlabeled=len(sources.extras),
        categories=len(sources.categories),
        annotations_kept=sum(1 for r in rows for a in r.annotations if not a.get("iscrowd")),
        examples=report.examples,
        seconds=round(seconds, 2),
    )
    return result
