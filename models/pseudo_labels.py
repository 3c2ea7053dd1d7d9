"""Pseudo-labelling: the teacher on the weak view, eval-mode post-processing, score thresholding."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def filter_detections(output: dict[str, Tensor], score_threshold: float, mask_threshold: float = 0.5) -> dict[str, Tensor]:
    """Keep detections with score >= threshold; masks (probabilities) become binary at `mask_threshold`.

    The result holds ordinary tensors (cloned out of inference mode) so it can be a training target.
    """
    keep = output["scores"] >= score_threshold
    target = {k: output[k][keep].clone() for k in ("boxes", "labels", "scores")}
    if "masks" in output:
        target["masks"] = (output["masks"][keep, 0] >= mask_threshold).to(torch.uint8)
    return target


def pseudo_label(
    teacher: nn.Module, weak_images: list[Tensor], score_threshold: float, mask_threshold: float = 0.5
) -> list[dict[str, Tensor]]:
    """Teacher predictions on weakly augmented images, thresholded; an image may get no box at all."""
    teacher.eval()
    with torch.inference_mode():
        outputs = teacher(weak_images)
    return [filter_detections(o, score_threshold, mask_threshold) for o in outputs]
