"""The teacher's score picture on unlabeled images, and the score threshold its boxes must pass.

Kept in both threshold modes: with `ssl.score_threshold: auto` the per-class thresholds are fitted on it
every `ssl.threshold_refit_interval` steps; with a number it is only reported.
"""

from __future__ import annotations

from typing import Any

import torch

from models.pseudo_labels import Threshold
from models.thresholds import AdaptiveThresholds
from pipeline.config import SSLConfig


class TeacherScores:
    def __init__(self, ssl: SSLConfig, names: dict[int, str]):
        self.ssl, self.names = ssl, names
        self.adaptive = ssl.score_threshold == "auto"
        self.windows = AdaptiveThresholds(len(names), ssl.threshold_floor, ssl.threshold_ceiling, ssl.threshold_window)

    @property
    def threshold(self) -> Threshold:
        """The user's fixed threshold, or the current per-class thresholds."""
        return self.windows.values if self.adaptive else self.ssl.score_threshold

    def published(self) -> list[float] | None:
        """What labeler actors receive with the teacher weights (None: they keep the fixed threshold)."""
        return self.windows.values.tolist() if self.adaptive else None

    def observe(self, detections: list[dict[str, torch.Tensor]]) -> None:
        """Teacher scores before thresholding: what per-class thresholds are fitted on."""
        for d in detections:
            self.windows.observe(d["labels"], d["scores"])
        if self.adaptive and not self.windows.fitted:  # the first unlabeled batch: fit before thresholding it
            self.windows.refit()

    def after_step(self, step: int) -> None:
        if self.adaptive and step % self.ssl.threshold_refit_interval == 0:
            self.windows.refit()

    def scalars(self) -> dict[str, float]:
        if not self.adaptive:
            return {}
        return {f"threshold/{self.names[k]}": float(self.windows.values[k]) for k in self.names}

    def per_class_windows(self) -> dict[str, list[float]]:
        return {self.names[k]: list(w) for k, w in zip(sorted(self.names), self.windows.windows)}

    def summary(self) -> dict[str, Any]:
        """`thresholds` (per class) and `score_quantiles` (10/50/90 % of each class's teacher scores)."""
        quantiles = self.windows.quantiles()
        threshold = self.threshold
        return {
            "thresholds": {self.names[k]: float(threshold[k] if self.adaptive else threshold) for k in self.names},
            "score_quantiles": {self.names[k]: quantiles[k - 1] for k in self.names},
        }
