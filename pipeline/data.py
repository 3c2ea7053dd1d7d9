"""Rows of the prepared Parquet shards -> tensors the detector takes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from pipeline.augment import make_target


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


def read_rows(directory: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """All rows of one prepared split (for the local trainer and evaluation on small sets)."""
    files = sorted(Path(directory).glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]


def infinite_indices(n: int, seed: int) -> Iterator[int]:
    """Reshuffled every epoch, reproducible from the seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()
