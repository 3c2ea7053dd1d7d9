"""Drawing helpers for the tracker: matplotlib figures and pseudo-label image grids.

Figures are built on an Agg canvas directly, without pyplot: no global figure registry to leak from
long runs, no display needed, and the process-wide matplotlib backend is left alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

# Distinct colours for classes (tab10 as RGB); class labels index it cyclically.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _grouped_bars(title: str, ylabel: str, names: list[str], series: dict[str, list[float]]) -> Figure:
    fig = Figure(figsize=(max(5.0, 0.7 * len(names) * len(series) + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        offsets = positions + (i - (len(series) - 1) / 2) * width
        ax.bar(offsets, values, width, label=label)
        for x, value in zip(offsets, values):
            if math.isnan(value):  # undefined (e.g. no ground truth of that class): say so, not a zero bar
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(positions, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def per_class_ap_bars(teacher_per_class: dict[str, float | None], student_per_class: dict[str, float | None]) -> Figure:
    """Teacher vs student bbox AP per class; classes with undefined AP (None) get no bar."""
    names = list(dict.fromkeys([*teacher_per_class, *student_per_class]))

    def values(per_class: dict[str, float | None]) -> list[float]:
        return [math.nan if per_class.get(n) is None else float(per_class[n]) for n in names]

    return _grouped_bars(
        "Per-class AP (bbox)",
        "AP (%)",
        names,
        {"teacher": values(teacher_per_class), "student": values(student_per_class)},
    )


def pseudo_label_distribution(pseudo_counts: dict[str, int], labeled_hist: dict[str, int]) -> Figure:
    """Share of pseudo-labels per class next to the labeled split's class prior."""
    names = list(dict.fromkeys([*labeled_hist, *pseudo_counts]))

    def shares(counts: dict[str, int]) -> list[float]:
        total = sum(counts.values())
        return [counts.get(n, 0) / total if total else 0.0 for n in names]

    return _grouped_bars(
        "Pseudo-label class distribution vs labeled prior",
        "share of boxes",
        names,
        {"pseudo-labels": shares(pseudo_counts), "labeled prior": shares(labeled_hist)},
    )


def score_histograms(scores: dict[str, list[float]], thresholds: dict[str, float]) -> Figure:
    """Per class, the teacher's scores on unlabeled images and the threshold applied to them."""
    names = list(scores)
    cols = min(4, max(len(names), 1))
    rows = math.ceil(len(names) / cols) or 1
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(scores[name], bins=np.linspace(0, 1, 41), color="tab:blue")
        ax.axvline(thresholds[name], color="tab:red", linestyle="--")
        ax.set_title(f"{name} (n={len(scores[name])}, t={thresholds[name]:.2f})", fontsize=9)
        ax.set_xlim(0, 1)
    fig.suptitle("Teacher scores on unlabeled images and pseudo-label thresholds")
    return fig


def _draw(image: Tensor, target: dict[str, Tensor], names: dict[int, str]) -> Tensor:
    canvas = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if canvas.shape[0] == 1:
        canvas = canvas.expand(3, -1, -1)
    labels = [int(v) for v in target.get("labels", torch.zeros(0)).tolist()]
    colors = [PALETTE[label % len(PALETTE)] for label in labels]
    masks = target.get("masks")
    if masks is not None and len(masks):
        masks = masks.detach().cpu()
        masks = (masks.squeeze(1) if masks.dim() == 4 else masks) > 0.5
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.4, colors=colors)
    boxes = target.get("boxes")
    if boxes is not None and len(boxes):
        scores = target.get("scores")
        text = [names.get(label, str(label)) for label in labels]
        if scores is not None:
            text = [f"{t} {s:.2f}" for t, s in zip(text, scores.tolist())]
        text = target.get("captions", text)  # the caller's own words for each box
        canvas = draw_bounding_boxes(
            canvas, boxes.detach().cpu().float(), labels=text, colors=colors, width=2, fill_labels=True
        )
    return canvas


def pseudo_label_grid(
    images: list[Tensor], targets: list[dict[str, Tensor]], names: dict[int, str], nrow: int = 4
) -> np.ndarray:
    """Images (float CHW in [0, 1]) with their boxes, class names, scores and masks, tiled: uint8 HWC."""
    drawn = [_draw(image, target, names) for image, target in zip(images, targets)]
    if not drawn:
        raise ValueError("pseudo_label_grid needs at least one image")
    height, width = max(d.shape[1] for d in drawn), max(d.shape[2] for d in drawn)
    padded = [torch.nn.functional.pad(d, (0, width - d.shape[2], 0, height - d.shape[1])) for d in drawn]
    grid = make_grid(padded, nrow=min(nrow, len(padded)), padding=2, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()
