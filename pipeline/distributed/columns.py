"""Rows as the Ray Data streams carry them between stages: uint8 CHW images as numpy arrays, boxes as flat
float32 lists, labels as int64 arrays, masks as COCO RLE strings; and back into detector targets."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

# A Ray Data numpy batch: one array (or list) per column, one entry per row.
Columns = dict[str, np.ndarray]


def batch_rows(batch: Columns) -> list[dict[str, Any]]:
    """A Ray Data numpy batch (columns) -> its rows."""
    n = len(batch["image_id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def encode_masks(masks: torch.Tensor) -> list[str]:
    rles = mask_utils.encode(np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [json.dumps({"size": r["size"], "counts": r["counts"].decode()}) for r in rles]


def decode_masks(rles: list[str], height: int, width: int) -> torch.Tensor:
    if len(rles) == 0:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    decoded = [json.loads(r) for r in rles]
    return torch.as_tensor(mask_utils.decode(decoded).transpose(2, 0, 1).copy())


def flat(boxes: torch.Tensor) -> np.ndarray:
    """Boxes (N, 4) (or any per-box rows), plain or tv_tensors -> one flat float32 array."""
    return boxes.as_subclass(torch.Tensor).reshape(-1).numpy().astype(np.float32)


def class_probs(values: np.ndarray, boxes: int) -> torch.Tensor:
    """A flat class-probability column -> (boxes, classes + 1); an image with no pseudo-box gets (0, 0)."""
    probs = torch.from_numpy(values)
    return probs.reshape(boxes, -1) if boxes else probs.reshape(0, 0)


def to_target(boxes, labels, masks=None, size: tuple[int, int] | None = None, scores=None) -> dict[str, torch.Tensor]:
    """One row's flat columns -> a detector target (or, with scores, a detection)."""
    target = {"boxes": torch.from_numpy(boxes.reshape(-1, 4)), "labels": torch.from_numpy(labels)}
    if masks is not None:
        target["masks"] = decode_masks(list(masks), *size)
    if scores is not None:
        target["scores"] = torch.from_numpy(scores)
    return target
