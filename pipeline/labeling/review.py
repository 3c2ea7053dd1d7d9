"""Which auto-labelled images a person should look at first, and picture grids of them.

Ranking rule: an image's *candidates* are the teacher's detections scoring at least `t - 0.2`, with `t`
the threshold of the detection's class. Its uncertainty is the share of candidates whose score falls
in the middle band `[t - 0.2, t + 0.1)`: boxes the threshold barely dropped or barely kept. Images rank
by that share (high first), ties by the mean candidate score (low first), then by image id. An image
with no candidate ranks last (share 0, mean taken as 1). The grids draw each image's kept boxes and the
band's dropped ones (captioned "dropped"), so a reviewer sees what the threshold decided.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.tracking.plots import pseudo_label_grid

BAND_BELOW, BAND_ABOVE = 0.2, 0.1
LISTED = 1000  # review.json lists this many images (or --review N if more)
GRID_IMAGES = 8  # images per grid picture


@dataclass(frozen=True)
class Uncertainty:
    share: float  # candidates in the middle band / candidates
    mean_score: float
    candidates: int

    def priority(self, image_id: int) -> tuple[float, float, int]:
        """Larger is reviewed first."""
        return self.share, -self.mean_score, -image_id


def uncertainty(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> Uncertainty:
    """The rule above, for one image's detections (model labels, scores) and per-label thresholds."""
    t = thresholds[np.asarray(labels, dtype=np.int64)]
    candidates = scores >= t - BAND_BELOW
    n = int(candidates.sum())
    if n == 0:
        return Uncertainty(0.0, 1.0, 0)
    in_band = candidates & (scores < t + BAND_ABOVE)
    return Uncertainty(float(in_band.sum()) / n, float(scores[candidates].mean()), n)


@dataclass(order=True)
class _Entry:
    priority: tuple[float, float, int]
    summary: dict = field(compare=False)
    picture: Any = field(compare=False, default=None)  # (uint8 CHW image, target) for the grids


class ReviewQueue:
    """The most uncertain images seen so far, in bounded memory: summaries of `listed` images and
    pixels of the `pictured` ones."""

    def __init__(self, pictured: int, listed: int = LISTED):
        self.pictured, self.listed = pictured, max(listed, pictured)
        self._listed: list[_Entry] = []
        self._pictured: list[_Entry] = []
        self.seen = 0

    def offer(self, image_id: int, u: Uncertainty, summary: dict, picture) -> None:
        """`picture` is a zero-argument callable: it is only called for an image that enters the top."""
        self.seen += 1
        entry = _Entry(
            u.priority(image_id),
            {
                "image_id": image_id,
                "uncertainty": round(u.share, 4),
                "mean_score": round(u.mean_score, 4),
                "candidates": u.candidates,
                **summary,
            },
        )
        _push(self._listed, entry, self.listed)
        if self.pictured and (len(self._pictured) < self.pictured or entry > self._pictured[0]):
            _push(self._pictured, _Entry(entry.priority, entry.summary, picture()), self.pictured)

    def ranked(self) -> list[dict]:
        return [{"rank": i, **e.summary} for i, e in enumerate(sorted(self._listed, reverse=True), start=1)]

    def pictures(self) -> list[tuple[dict, Any]]:
        return [(e.summary, e.picture) for e in sorted(self._pictured, reverse=True)]


def _push(heap: list[_Entry], entry: _Entry, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, entry)
    elif size and entry > heap[0]:
        heapq.heapreplace(heap, entry)


def write_grids(pictures: list[tuple[dict, Any]], names: dict[int, str], folder: Path) -> list[Path]:
    """review/grid_NN.png: GRID_IMAGES images each, in review order, boxes with class and score drawn."""
    from pipeline.data.augment import to_float

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("grid_*.png"):
        old.unlink()
    paths = []
    for start in range(0, len(pictures), GRID_IMAGES):
        chunk = pictures[start : start + GRID_IMAGES]
        grid = pseudo_label_grid([to_float(image) for _, (image, _) in chunk], [t for _, (_, t) in chunk], names)
        path = folder / f"grid_{start // GRID_IMAGES:02d}.png"
        Image.fromarray(grid).save(path)
        paths.append(path)
    return paths


def rule_text() -> str:
    return (
        f"share of the teacher's detections scoring >= t - {BAND_BELOW} (t: the class threshold) that fall in "
        f"[t - {BAND_BELOW}, t + {BAND_ABOVE}), high first; ties: lower mean score of those detections first"
    )
