"""Pseudo-label statistics: counts per class, precision and recall against held-aside labels, staleness;
and the labeled split's class and density figures they are read beside."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from pipeline.data.schema import LABELED_DIR


@dataclass
class PseudoLabelStats:
    """Pseudo-label counts per class, and their precision/recall against held-aside labels (IoU 0.5); of the
    misses, the share that sits on an object of another class (the teacher's class confusion)."""

    images: int = 0
    boxes: int = 0
    per_class: Counter = field(default_factory=Counter)
    matched: int = 0
    wrong_class: int = 0
    gt_boxes: int = 0
    scored_boxes: int = 0
    staleness_max: int | None = None
    staleness_sum: int = 0
    staleness_rows: int = 0

    def add(self, pseudo: dict[str, Tensor], held_aside: dict[str, Tensor] | None) -> None:
        self.images += 1
        self.boxes += len(pseudo["labels"])
        self.per_class.update(pseudo["labels"].tolist())
        if held_aside is not None:
            self.gt_boxes += len(held_aside["labels"])
            self.scored_boxes += len(pseudo["labels"])
            hits, wrong_class = _match(pseudo, held_aside)
            self.matched += hits
            self.wrong_class += wrong_class

    def add_staleness(self, steps: int) -> None:
        """Student step minus the step of the teacher that labelled the row (running, O(1) memory)."""
        self.staleness_max = steps if self.staleness_max is None else max(self.staleness_max, steps)
        self.staleness_sum += steps
        self.staleness_rows += 1

    def summary(self, names: dict[int, str]) -> dict[str, Any]:
        out = {
            "pseudo_labels_per_image": self.boxes / max(self.images, 1),
            "pseudo_labeled_images": self.images,
            "pseudo_label_class_counts": {names[k]: self.per_class.get(k, 0) for k in sorted(names)},
            "pseudo_label_precision": self.matched / self.scored_boxes if self.scored_boxes else None,
            "pseudo_label_recall": self.matched / self.gt_boxes if self.gt_boxes else None,
            "pseudo_label_wrong_class": self.wrong_class / self.scored_boxes if self.scored_boxes else None,
        }
        if self.staleness_rows:
            out["staleness_max"] = self.staleness_max
            out["staleness_mean"] = self.staleness_sum / self.staleness_rows
        return out

    def since(self, earlier: dict[str, Any]) -> dict[str, float | None]:
        """Boxes per image, precision and recall of the pseudo-labels counted after the `earlier` state."""
        images, boxes = self.images - earlier["images"], self.boxes - earlier["boxes"]
        matched, wrong_class = self.matched - earlier["matched"], self.wrong_class - earlier.get("wrong_class", 0)
        scored, gt = self.scored_boxes - earlier["scored_boxes"], self.gt_boxes - earlier["gt_boxes"]
        return {
            "pseudo_labels_per_image": boxes / images if images else None,
            "pseudo_label_precision": matched / scored if scored else None,
            "pseudo_label_recall": matched / gt if gt else None,
            "pseudo_label_wrong_class": wrong_class / scored if scored else None,
        }

    def state(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "boxes": self.boxes,
            "per_class": dict(self.per_class),
            "matched": self.matched,
            "wrong_class": self.wrong_class,
            "gt_boxes": self.gt_boxes,
            "scored_boxes": self.scored_boxes,
            "staleness_max": self.staleness_max,
            "staleness_sum": self.staleness_sum,
            "staleness_rows": self.staleness_rows,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "PseudoLabelStats":
        return cls(**{**state, "per_class": Counter({int(k): v for k, v in state["per_class"].items()})})


def match_boxes(pseudo: dict[str, Tensor], gt: dict[str, Tensor]) -> tuple[list[int], list[int]]:
    """For each pseudo-box (in score order): the held-aside box it hits (same class, IoU >= 0.5, one-to-one,
    greedy by score; -1 for none) and, for a miss, the held-aside box of another class it sits on (IoU >= 0.5;
    -1 for none)."""
    n = len(pseudo["boxes"])
    if n == 0 or len(gt["boxes"]) == 0:
        return [-1] * n, [-1] * n
    iou = box_iou(pseudo["boxes"].cpu(), gt["boxes"].cpu())
    other_class = pseudo["labels"].cpu()[:, None] != gt["labels"].cpu()[None, :]
    best_other_iou, best_other = torch.where(other_class, iou, 0.0).max(dim=1)
    iou[other_class] = 0.0
    used, hits, others = set(), [], []
    for i, row in enumerate(iou):
        candidates = [(v, j) for j, v in enumerate(row.tolist()) if v >= 0.5 and j not in used]
        hit = max(candidates)[1] if candidates else -1
        if hit >= 0:
            used.add(hit)
        hits.append(hit)
        others.append(int(best_other[i]) if hit < 0 and best_other_iou[i] >= 0.5 else -1)
    return hits, others


def _match(pseudo: dict[str, Tensor], gt: dict[str, Tensor]) -> tuple[int, int]:
    """How many pseudo-boxes hit a held-aside box, and how many misses sit on an object of another class."""
    hits, others = match_boxes(pseudo, gt)
    return sum(h >= 0 for h in hits), sum(o >= 0 for o in others)


def _labeled_label_lists(prepared: str | Path) -> list[list[int]]:
    """Each labeled image's box labels, shard by shard."""
    import pyarrow.parquet as pq

    files = sorted((Path(prepared) / LABELED_DIR).glob("*.parquet"))
    return [labels for f in files for labels in pq.read_table(f, columns=["labels"]).column("labels").to_pylist()]


def labeled_class_histogram(prepared: str | Path, names: dict[int, str]) -> dict[str, int]:
    counts: Counter = Counter()
    for labels in _labeled_label_lists(prepared):
        counts.update(labels)
    return {names[k]: counts.get(k, 0) for k in sorted(names)}


def labeled_boxes_per_image(prepared: str | Path, num_classes: int) -> torch.Tensor:
    """Mean labeled boxes per image of each model label (index 0, background, stays 0): the density prior."""
    counts, images = torch.zeros(num_classes + 1), 0
    for labels in _labeled_label_lists(prepared):
        counts += torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes + 1).float()
        images += 1
    return counts / max(images, 1)
