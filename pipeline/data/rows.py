"""Rows of the prepared Parquet shards -> tensors the detector takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.annotations import valid_segmentation
from pipeline.data.augment import make_target
from pipeline.data.coco_io import load_coco
from pipeline.data.schema import LABELED_DIR, VAL_GT_FILE
from pipeline.data.shards import read_rows
from pipeline.errors import InputError

# What decoding a row raises on damaged image bytes (torchvision's decoders, an empty buffer).
DECODE_FAILURES = (RuntimeError, ValueError)


def decode_image_bytes(data: bytes) -> tv_tensors.Image:
    """Encoded bytes -> uint8 RGB image (CHW)."""
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tv_tensors.Image(decode_image(buffer, mode=ImageReadMode.RGB))


def segmentation_to_mask(segmentation: str, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (JSON polygon list or RLE) -> binary HxW mask."""
    seg = json.loads(segmentation) if segmentation else []
    if not seg:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


def decode_row(row: dict[str, Any], with_masks: bool = False) -> tuple[tv_tensors.Image, dict]:
    """One Parquet row -> (image, target with tv_tensors boxes/masks)."""
    image = decode_image_bytes(row["image"])
    height, width = image.shape[-2:]
    boxes = torch.as_tensor(np.asarray(list(row["boxes"]), dtype=np.float32).reshape(-1, 4))
    labels = torch.as_tensor(np.asarray(list(row["labels"]), dtype=np.int64))
    masks = None
    if with_masks:
        segs = list(row["segmentations"])
        stack = [segmentation_to_mask(s, height, width) for s in segs]
        masks = torch.as_tensor(np.stack(stack) if stack else np.zeros((0, height, width), np.uint8))
    return image, make_target(boxes, labels, (height, width), masks)


def require_segmentations(prepared: str | Path) -> None:
    """Mask R-CNN needs a usable mask for every labeled box and for the validation ground truth: without this
    check a set without segmentations trains the mask head on empty masks and reports a meaningless mask AP,
    and a malformed one fails mid-training."""
    labeled = Path(prepared) / LABELED_DIR
    rows = read_rows(labeled, columns=["image_id", "width", "height", "segmentations"])
    segs = [(r, s) for r in rows for s in r["segmentations"]]
    missing = sum(1 for _, s in segs if not s)
    if missing:
        raise InputError(
            f"{labeled}: {missing} of {len(segs)} labeled boxes have no segmentation; "
            "model.arch=mask_rcnn needs polygon or RLE masks (`ssod synth --masks`, or COCO "
            "annotations with `segmentation`)"
        )
    bad = next((r["image_id"] for r, s in segs if not valid_segmentation(_json(s), r["height"], r["width"])), None)
    if bad is not None:
        raise InputError(
            f"{labeled}: image {bad} has a segmentation that is neither polygons nor an RLE of its "
            "size; run `ssod prepare` again (it drops and counts those)"
        )
    _require_val_segmentations(Path(prepared) / VAL_GT_FILE)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _require_val_segmentations(val_gt: Path) -> None:
    if not val_gt.exists():
        return
    coco = load_coco(val_gt)
    sizes = {i["id"]: (i.get("height"), i.get("width")) for i in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("segmentation"):
            raise InputError(f"{val_gt}: validation boxes without segmentation; model.arch=mask_rcnn scores masks")
        if not valid_segmentation(a["segmentation"], *sizes.get(a["image_id"], (0, 0))):
            raise InputError(
                f"{val_gt}: annotation {a.get('id')} has a segmentation that is neither polygons "
                "nor an RLE of its image's size"
            )


def infinite_indices(n: int, seed: int) -> Iterator[int]:
    """Reshuffled every epoch, reproducible from the seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()
