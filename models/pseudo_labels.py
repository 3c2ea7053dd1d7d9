"""Pseudo-labelling: the teacher on the weak view, eval-mode post-processing, score thresholding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# One threshold for every class, or a tensor indexed by model label (0 = background): per-class thresholds.
Threshold = float | Tensor


def filter_detections(
    output: dict[str, Tensor], score_threshold: Threshold, mask_threshold: float = 0.5
) -> dict[str, Tensor]:
    """Keep detections with score >= threshold; masks (probabilities) become binary at `mask_threshold`.

    The result holds ordinary tensors (cloned out of inference mode) so it can be a training target.
    """
    if isinstance(score_threshold, Tensor):
        score_threshold = score_threshold.to(output["scores"].device)[output["labels"]]
    keep = output["scores"] >= score_threshold
    target = {k: output[k][keep].clone() for k in ("boxes", "labels", "scores")}
    if "masks" in output:
        target["masks"] = (output["masks"][keep, 0] >= mask_threshold).to(torch.uint8)
    return target


def teacher_detections(teacher: nn.Module, weak_images: list[Tensor]) -> list[dict[str, Tensor]]:
    """The teacher's eval-mode detections on weakly augmented images, before any pseudo-label threshold."""
    teacher.eval()
    with torch.inference_mode():
        return teacher(weak_images)


def pseudo_label(
    teacher: nn.Module, weak_images: list[Tensor], score_threshold: Threshold, mask_threshold: float = 0.5
) -> list[dict[str, Tensor]]:
    """Teacher predictions on weakly augmented images, thresholded; an image may get no box at all."""
    return [filter_detections(o, score_threshold, mask_threshold) for o in teacher_detections(teacher, weak_images)]
