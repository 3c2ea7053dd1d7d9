"""COCO input: JSON loading with one-line errors, structure checks, box cleaning (image files: image_files.py).

Everything here is pure or works on one file at a time; `pipeline.data.prepare` drives it. Problems that
can be fixed or skipped are counted in a `Report`; the rest raise `InputError`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.annotations import clean_box, valid_segmentation
from pipeline.data.image_files import ImageCheck
from pipeline.errors import InputError

EXAMPLES_PER_PROBLEM = 5


@dataclass
class Report:
    """Counts of skipped/fixed problems and the first few file names for each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, problem: str, example: str, n: int = 1) -> None:
        self.counts[problem] += n
        names = self.examples.setdefault(problem, [])
        if len(names) < EXAMPLES_PER_PROBLEM and example not in names:
            names.append(example)


@dataclass
class ImageRecord:
    """One kept image with its real size and cleaned COCO annotations (bbox xywh, clipped)."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    convert: bool
    from_coco: bool = True  # the row's `annotated` column: False for extra raw images
    entry: dict = field(default_factory=dict)  # the COCO image entry, with the real width/height
    annotations: list[dict] = field(default_factory=list)  # crowd ones included, for evaluation

    @property
    def has_boxes(self) -> bool:
        """At least one trainable (non-crowd) annotation survived cleaning."""
        return any(not a.get("iscrowd") for a in self.annotations)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or malformed file is an InputError naming it (with line/col)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def load_coco(path: str | Path) -> dict:
    """Load a COCO annotations file and check the structure every later step relies on."""
    coco = read_json(path)
    if not isinstance(coco, dict):
        raise InputError(f"{path}: not a COCO annotations file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise InputError(f"{path}: not a COCO annotations file (missing or non-list '{key}')")
    _check_entries(path, "images", coco["images"], ("id", "file_name"))
    _check_entries(path, "annotations", coco["annotations"], ("id", "image_id"))
    _check_entries(path, "categories", coco["categories"], ("id",))
    _check_unique(path, "image", [img["id"] for img in coco["images"]])
    _check_unique(path, "category", [cat["id"] for cat in coco["categories"]])
    _check_unique_names(path, coco["categories"])
    return coco


def category_name(category: dict) -> str:
    """A category's identity across files: its name (its id when it has none)."""
    return str(category.get("name", category["id"]))


def _check_unique_names(path: str | Path, categories: list[dict]) -> None:
    first_id: dict[str, int] = {}
    for cat in categories:
        name = category_name(cat)
        if name in first_id:
            raise InputError(f"{path}: categories {first_id[name]} and {cat['id']} share the name {name!r}")
        first_id[name] = cat["id"]


def map_categories(coco: dict, path: str | Path, reference: list[dict], reference_path: str | Path) -> tuple[dict, int]:
    """`coco` with its annotations' category ids rewritten to `reference`'s ids of the same NAME (another
    file's ids may differ: 0- vs 1-based, another order); returns it and how many categories changed id.

    A category name `reference` lacks is an InputError naming it; an annotation whose category id is not
    one of `coco`'s own categories keeps no id (counted later as an unknown category)."""
    reference_id = {category_name(c): c["id"] for c in reference}
    to_reference: dict[int, int] = {}
    for cat in coco["categories"]:
        name = category_name(cat)
        if name not in reference_id:
            raise InputError(
                f"{path}: category {name!r} (id {cat['id']}) is not a category of {reference_path} "
                f"({', '.join(repr(n) for n in reference_id)})"
            )
        to_reference[cat["id"]] = reference_id[name]
    changed = sum(1 for old, new in to_reference.items() if old != new)
    annotations = [
        {**a, "category_id": to_reference.get(a.get("category_id")) if _is_id(a.get("category_id")) else None}
        for a in coco["annotations"]
    ]
    return {**coco, "annotations": annotations}, changed


def _is_id(value: Any) -> bool:
    """A COCO id: an int, not a bool (True would be taken for id 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(path: str | Path, key: str, entries: list, required: tuple[str, ...]) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in required):
            raise InputError(f"{path}: {key}[{i}] must be an object with keys {', '.join(required)}")
        if "id" in required and not _is_id(entry["id"]):
            raise InputError(f"{path}: {key}[{i}] has a non-integer id {entry['id']!r}")


def _check_unique(path: str | Path, what: str, ids: list[int]) -> None:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise InputError(f"{path}: duplicate {what} id {i}")
        seen.add(i)


def category_table(categories: list[dict]) -> list[dict]:
    """Categories sorted by COCO id with contiguous model labels 1..K."""
    ordered = sorted(categories, key=lambda c: c["id"])
    return [{"id": c["id"], "name": str(c.get("name", c["id"])), "label": k} for k, c in enumerate(ordered, 1)]


def build_records(
    coco: dict, images_dir: Path, checks: dict[Path, ImageCheck], label_of: dict[int, int], report: Report
) -> list[ImageRecord]:
    """Kept images (decodable) of one COCO file with their cleaned annotations, in file order."""
    records: dict[int, ImageRecord] = {}
    files: set[str] = set()
    for entry in coco["images"]:
        name = str(entry["file_name"])
        file = os.path.normpath(images_dir / name)
        if file in files:  # the same pixels under two ids: the later entry's boxes belong to another picture
            report.add("duplicate_file_names", f"{name} (image {entry['id']})")
            continue
        files.add(file)
        check = _kept_check(name, images_dir / name, checks, report)
        if check is None:
            continue
        if (entry.get("width"), entry.get("height")) != (check.width, check.height):
            report.add("size_mismatch_images", name)
        clean_entry = {**entry, "width": check.width, "height": check.height}
        records[entry["id"]] = ImageRecord(
            entry["id"], name, images_dir / name, check.width, check.height, check.convert, entry=clean_entry
        )
    file_images = {entry["id"]: entry for entry in coco["images"]}
    for ann in _unique_annotation_ids(coco["annotations"], report):
        _add_annotation(ann, records, file_images, label_of, report)
    return list(records.values())


def extra_records(
    folder: Path, paths: list[Path], checks: dict[Path, ImageCheck], first_id: int, report: Report
) -> list[ImageRecord]:
    """Kept raw images of an unannotated folder, with consecutive ids from `first_id` in path order."""
    records = []
    for path in paths:
        name = path.relative_to(folder).as_posix()
        check = _kept_check(name, path, checks, report)
        if check is None:
            continue
        image_id = first_id + len(records)
        entry = {"id": image_id, "file_name": name, "width": check.width, "height": check.height}
        records.append(ImageRecord(image_id, name, path, check.width, check.height, check.convert, False, entry))
    return records


def _kept_check(name: str, path: Path, checks: dict[Path, ImageCheck], report: Report) -> ImageCheck | None:
    """The image's check when it can be used (counting conversions), None (counted) when it is skipped."""
    check = checks[path]
    for warning in check.warnings:
        report.add("image_warnings", f"{name}: {warning}")
    if check.status != "ok":
        report.add(f"{check.status}_images", name)
        return None
    if check.convert:
        report.add("converted_images", name)
    return check


def _unique_annotation_ids(annotations: list[dict], report: Report) -> Iterable[dict]:
    """Annotations, duplicate ids renumbered above the largest id so that COCO eval sees every one."""
    next_id = max((a["id"] for a in annotations), default=0) + 1
    seen: set[int] = set()
    for ann in annotations:
        if ann["id"] in seen:
            report.add("duplicate_annotation_ids", f"annotation {ann['id']}")
            ann = {**ann, "id": next_id}
            next_id += 1
        seen.add(ann["id"])
        yield ann


def _add_annotation(
    ann: dict, records: dict[int, ImageRecord], file_images: dict, label_of: dict[int, int], report: Report
) -> None:
    image_id = ann["image_id"]
    if not _is_id(image_id) or image_id not in file_images:
        report.add("orphan_annotations", f"annotation {ann['id']}")
        return
    record = records.get(image_id)
    if record is None:  # its image is missing, corrupt or a duplicate file name, already counted
        return
    category = ann.get("category_id")
    if not _is_id(category) or category not in label_of:
        report.add("unknown_category_annotations", record.file_name)
        return
    status, box = clean_box(ann.get("bbox"), record.width, record.height)
    if box is None:
        report.add(f"dropped_{status}_boxes", record.file_name)
        return
    if status == "clipped":
        report.add("clipped_boxes", record.file_name)
    ann = {**ann, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
    if ann.get("segmentation") and not valid_segmentation(ann["segmentation"], record.height, record.width):
        report.add("dropped_invalid_segmentations", record.file_name)  # the box stays: it is still a good label
        ann.pop("segmentation")
    if ann.get("iscrowd"):
        report.add("crowd_annotations", record.file_name)
    record.annotations.append(ann)
