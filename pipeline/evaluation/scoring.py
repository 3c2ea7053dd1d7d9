"""COCO scoring with pycocotools, returning plain JSON-serialisable numbers.

AP values are percentages in [0, 100] (as Detectron2 reports them). Where
pycocotools reports -1 (no ground truth for that area range or class, so the
metric is undefined) the value here is ``None``: JSON has no NaN, and ``0.0``
would wrongly read as "measured and bad".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.errors import InputError

_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow pycocotools' progress prints (stdout only; errors still raise)."""
    return contextlib.redirect_stdout(io.StringIO())


def _load_gt_dict(gt: dict | str | Path) -> dict:
    if isinstance(gt, dict):
        return copy.deepcopy(gt)
    path = Path(gt)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: COCO ground-truth file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _gt_coco(gt: dict | str | Path) -> COCO:
    """Build a pycocotools COCO object, filling the optional annotation fields."""
    data = _load_gt_dict(gt)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"COCO ground truth lacks the '{key}' list")
    for i, ann in enumerate(data["annotations"], start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def _empty_results(gt: COCO) -> COCO:
    """A result set with no detections (``COCO.loadRes`` fails on an empty list)."""
    res = COCO()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    with _quiet():
        res.createIndex()
    return res


def _results_for(gt: COCO, detections: list[dict], iou_type: str) -> COCO:
    """Copy the detections for one IoU type and load them as a result set.

    For "segm" the box is dropped so pycocotools takes the area from the mask
    (it would otherwise use the box area for the small/medium/large split).
    """
    drop = "bbox" if iou_type == "segm" else "segmentation"
    anns = [{k: v for k, v in d.items() if k != drop} for d in detections]
    if iou_type == "segm" and any("segmentation" not in a for a in anns):
        raise ValueError("segm scoring needs a 'segmentation' in every detection")
    if not anns:
        return _empty_results(gt)
    with _quiet():
        return gt.loadRes(anns)


def _ap(value: float) -> float | None:
    """pycocotools' -1 (undefined) -> None; otherwise a percentage."""
    return None if value < 0 else float(value) * 100.0


def _per_class_ap(evaluator: COCOeval, gt: COCO) -> dict[str, float | None]:
    """Mean precision over IoU thresholds and recall points, area "all", 100 dets."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    area = evaluator.params.areaRngLbl.index("all")
    max_dets = evaluator.params.maxDets.index(100)
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, area, max_dets]
        p = p[p > -1]
        name = gt.cats[int(cat_id)]["name"]
        out[name] = float(np.mean(p)) * 100.0 if p.size else None
    return out


def _evaluate(gt: COCO, results: COCO, iou_type: str) -> dict:
    evaluator = COCOeval(gt, results, iou_type)
    evaluator.params.imgIds = sorted(gt.getImgIds())
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = {key: _ap(evaluator.stats[i]) for i, key in enumerate(_SUMMARY_KEYS)}
    summary["per_class"] = _per_class_ap(evaluator, gt)
    return summary


def score_coco(gt: dict | str | Path, detections: list[dict], iou_types: tuple[str, ...] = ("bbox",)) -> dict:
    """Score COCO-format detections against a COCO ground truth (dict or JSON path).

    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl",
    "per_class": {category_name: AP}}}`` with APs in percent; an undefined
    metric (no ground truth of that size or class) is ``None``. Only the
    ground truth's images are scored: detections on other images are ignored.
    No detections at all give AP 0.0.
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
    gt_coco = _gt_coco(gt)
    img_ids = set(gt_coco.getImgIds())
    kept = [d for d in detections if d["image_id"] in img_ids]
    return {t: _evaluate(gt_coco, _results_for(gt_coco, kept, t), t) for t in iou_types}


def _encode_masks(masks: torch.Tensor, threshold: float) -> list[dict]:
    """[N,1,H,W] probabilities -> RLE dicts with str counts."""
    binary = (masks[:, 0] > threshold).to(torch.uint8).cpu().numpy()  # [N,H,W]
    rles = []
    for m in binary:
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("utf-8")
        rles.append(rle)
    return rles


def to_coco_results(
    image_ids: list[int],
    outputs: list[dict[str, torch.Tensor]],
    label_to_category: dict[int, int],
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert torchvision detection outputs (XYXY boxes) to COCO result dicts."""
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
    results: list[dict] = []
    for image_id, out in zip(image_ids, outputs):
        boxes = out["boxes"].detach().cpu().to(torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        masks = out.get("masks")
        rles = _encode_masks(masks.detach(), mask_threshold) if masks is not None else None
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            if label not in label_to_category:
                raise ValueError(f"label {label} has no COCO category id")
            det = {
                "image_id": int(image_id),
                "category_id": int(label_to_category[label]),
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
            if rles is not None:
                det["segmentation"] = rles[i]
            results.append(det)
    return results
