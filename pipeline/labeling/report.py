"""What `ssod label` measures and prints: counts per class, precision/recall of the kept boxes against
held-aside labels (one threshold, and a sweep), and how fast it went."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from pipeline.training.pseudo_stats import PseudoLabelStats

SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Tally:
    """Counts, box statistics and precision/recall against held-aside labels at each threshold asked for."""

    def __init__(self, sweep: bool):
        self.read = self.labeled = 0
        self.per_class: Counter = Counter()
        self.quality = PseudoLabelStats()
        self.sweep = {t: PseudoLabelStats() for t in (SWEEP if sweep else ())}
        self.label_seconds = 0.0

    def add(self, row: dict, kept: np.ndarray) -> None:
        self.read += 1
        self.labeled += int(kept.any())
        self.per_class.update(row["pl_labels"][kept].tolist())
        self.label_seconds += float(row["label_seconds"])
        if not row["annotated"]:
            return
        # copies: Ray Data hands out read-only arrays
        gt = {"boxes": torch.tensor(row["gt_boxes"].reshape(-1, 4)), "labels": torch.tensor(row["gt_labels"])}
        boxes, labels, scores = torch.tensor(row["pl_boxes"].reshape(-1, 4)), row["pl_labels"], row["pl_scores"]
        for stats, keep in [(self.quality, kept), *((s, scores >= t) for t, s in self.sweep.items())]:
            stats.add({"boxes": boxes[torch.from_numpy(keep)], "labels": torch.tensor(labels[keep])}, gt)


class Clock:
    """Wall time of the run, and when its first labelled block arrived (actor start-up, model load)."""

    def __init__(self) -> None:
        self.started, self.first_at, self.first_rows = time.perf_counter(), None, 0

    def block(self, rows: int) -> None:
        if self.first_at is None:
            self.first_at, self.first_rows = time.perf_counter(), rows

    def rates(self, rows: int) -> dict[str, float | None]:
        now = time.perf_counter()
        seconds, after_first = now - self.started, (now - self.first_at) if self.first_at else 0.0
        steady = rows - self.first_rows
        return {
            "seconds": round(seconds, 2),
            "startup_seconds": round(self.first_at - self.started, 2) if self.first_at else None,
            "images_per_s": round(rows / seconds, 3),
            # after the first block: what a long run approaches
            "steady_images_per_s": round(steady / after_first, 3) if steady > 0 and after_first else None,
        }


def quality(stats: PseudoLabelStats) -> dict[str, Any]:
    return {
        "precision": stats.matched / stats.scored_boxes if stats.scored_boxes else None,
        "recall": stats.matched / stats.gt_boxes if stats.gt_boxes else None,
        "kept_boxes": stats.scored_boxes,
        "held_aside_boxes": stats.gt_boxes,
        "images": stats.images,
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What `ssod label` prints: counts, speed, the threshold rule, precision/recall and the sweep table."""
    skipped = sum(report["images_skipped"].values())
    lines = [
        (
            f"labeled {report['images_read']} images ({skipped} skipped, {report['images_labeled']} with boxes) "
            f"in {report['seconds']} s, {report['images_per_s']} images/s: {report['boxes']} boxes"
        ),
        f"threshold: {report['threshold']['rule']} {json.dumps(report['threshold']['per_class'])}",
    ]
    if report["quality"]:
        q = report["quality"]
        lines.append(
            f"against held-aside labels (IoU 0.5): precision {_fmt(q['precision'])} "
            f"recall {_fmt(q['recall'])} over {q['images']} images"
        )
    if report.get("sweep"):
        lines.append(f"{'threshold':>9s} {'precision':>9s} {'recall':>6s} {'boxes':>6s}")
        lines += [
            f"{r['threshold']:9.2f} {_fmt(r['precision']):>9s} {_fmt(r['recall']):>6s} {r['kept_boxes']:6d}"
            for r in report["sweep"]
        ]
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
