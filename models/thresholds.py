"""Per-class pseudo-label thresholds fitted on the teacher's own scores (`ssl.score_threshold: auto`).

For each class a running window keeps the scores of the teacher's detections on unlabeled images. A
two-component Gaussian mixture is fitted to the window's scores above the floor; the class threshold is
the lowest score that the high-mean component claims (posterior >= 0.5), clipped to [floor, ceiling].
A class with too few scores above the floor keeps the floor, so the first boxes of a rare class are not
shut out.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

MIN_SCORES_TO_FIT = 20


def two_gaussian_split(scores: Tensor, iterations: int = 50) -> float | None:
    """The lowest score the high component of a 2-component 1-D GMM claims; None if it does not separate."""
    x = scores.double().flatten()
    if x.numel() < 2 or float(x.max() - x.min()) < 1e-6:
        return None
    lo, hi = torch.quantile(x, 0.25), torch.quantile(x, 0.75)
    means = torch.stack([lo, hi]) if hi > lo else torch.stack([x.min(), x.max()])
    variances = torch.full((2,), float(x.var()) + 1e-6, dtype=x.dtype)
    weights = torch.full((2,), 0.5, dtype=x.dtype)
    for _ in range(iterations):
        log_p = (
            torch.log(weights) - 0.5 * torch.log(2 * math.pi * variances) - (x[:, None] - means) ** 2 / (2 * variances)
        )
        resp = torch.softmax(log_p, dim=1)
        mass = resp.sum(0) + 1e-9
        weights = mass / mass.sum()
        means = (resp * x[:, None]).sum(0) / mass
        variances = (resp * (x[:, None] - means) ** 2).sum(0) / mass + 1e-6
    high = int(torch.argmax(means))
    claimed = x[resp[:, high] >= 0.5]
    if claimed.numel() == 0 or claimed.numel() == x.numel():
        return None
    return float(claimed.min())


class AdaptiveThresholds:
    """Running per-class score windows and the thresholds fitted on them."""

    def __init__(self, num_classes: int, floor: float, ceiling: float, window: int):
        if not 0.0 < floor <= ceiling <= 1.0:
            raise ValueError(f"thresholds need 0 < floor <= ceiling <= 1, got {floor}, {ceiling}")
        self.num_classes, self.floor, self.ceiling = num_classes, floor, ceiling
        self.windows = [deque(maxlen=window) for _ in range(num_classes)]
        self.values = torch.full((num_classes + 1,), floor)  # index = model label (0 is background)
        self.fitted = False

    def observe(self, labels: Tensor, scores: Tensor) -> None:
        """Scores of one image's teacher detections (model labels 1..K), before any threshold."""
        for label, score in zip(labels.tolist(), scores.tolist()):
            if 1 <= label <= self.num_classes:
                self.windows[label - 1].append(score)

    def refit(self) -> Tensor:
        for cls, window in enumerate(self.windows, start=1):
            # Fitted above the floor: below it the teacher's many near-background detections form a mode of
            # their own, and a mixture over all scores splits noise from "anything" (every class then sat
            # at the floor on the benchmark, pseudo-label precision 0.25).
            candidates = torch.tensor([s for s in window if s >= self.floor])
            split = two_gaussian_split(candidates) if len(candidates) >= MIN_SCORES_TO_FIT else None
            self.values[cls] = self.floor if split is None else min(max(split, self.floor), self.ceiling)
        self.fitted = True
        return self.values

    def quantiles(self, qs: tuple[float, ...] = (0.1, 0.5, 0.9)) -> list[list[float] | None]:
        """Per class, score quantiles of the window (None for a class with no score yet)."""
        q = torch.tensor(qs)
        return [torch.quantile(torch.tensor(list(w)), q).tolist() if w else None for w in self.windows]

    def state_dict(self) -> dict[str, list]:
        return {"values": self.values.tolist(), "windows": [list(w) for w in self.windows]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.values, self.fitted = torch.tensor(state["values"]), True
        for window, saved in zip(self.windows, state["windows"]):
            window.clear()
            window.extend(saved)
