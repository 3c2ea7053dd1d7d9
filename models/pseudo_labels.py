"""Pseudo-labelling: the teacher on the weak view (optionally with its mirror), eval-mode post-processing,
the score threshold and the density prior.

A teacher's output per image: `boxes`, `labels`, `scores` (and `masks` for Mask R-CNN); with
`background=True` also `proposal_boxes` / `proposal_background`: its top RPN proposals and the probability
its ROI head gives each of them of being background (what soft background weighting reads); with
`class_probs=True` also `class_probs`: its ROI head's class distribution (background first) of each detected
box (what soft class targets read), and `foreground`: one minus its background probability (what a cut on
the foreground score reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, nms

from models.class_targets import class_targets

# One threshold for every class, or a tensor indexed by model label (0 = background): per-class thresholds.
Threshold = float | Tensor
TTA_MODES = ("none", "flip")
CUT_SCORES = ("class", "foreground")
# With the cut on the foreground score, boxes of different classes on one object (torchvision reports a
# box per class) pass together; class-agnostic NMS at this IoU keeps the top class's.
FOREGROUND_NMS_IOU = 0.6
# Teacher boxes of the two views count as one object at this IoU (same class).
FLIP_MATCH_IOU = 0.55
# Proposals a teacher reports with their background probability, by objectness.
BACKGROUND_PROPOSALS = 256
# Keys a kept pseudo-label carries into the student's target besides boxes and labels (`image_size`: the
# (height, width) the proposal boxes refer to, since the detector's resize moves only `boxes`).
BACKGROUND_KEYS = ("proposal_boxes", "proposal_background", "image_size")


@dataclass(frozen=True)
class DensityPrior:
    """How many pseudo-boxes an image may hold, from the labeled set's boxes per image.

    `per_class[c]`: mean labeled boxes of model label c per image (index 0, background, unused).
    At most ceil(`multiple` * per_class[c]) boxes of class c are kept per image (the most confident);
    when the score cut keeps fewer than `floor` * (mean boxes per image) in all, the teacher's most
    confident remaining boxes scoring >= `min_score` fill up to that count.
    """

    per_class: Tensor
    multiple: float
    floor: float
    min_score: float

    def caps(self) -> Tensor:
        return torch.ceil(self.multiple * self.per_class).long()

    def floor_count(self) -> int:
        return math.floor(self.floor * float(self.per_class[1:].sum()))


def _mirror(detection: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """Detections on a horizontally flipped image, mapped back onto the original image."""
    out = dict(detection)  # class probabilities do not change under a mirror
    for key in ("boxes", "proposal_boxes"):
        if key in out:
            boxes = out[key].clone()
            boxes[:, [0, 2]] = width - out[key][:, [2, 0]]
            out[key] = boxes
    if "masks" in out:
        out["masks"] = out["masks"].flip(-1)
    return out


def fuse_views(a: dict[str, Tensor], b: dict[str, Tensor], iou: float = FLIP_MATCH_IOU) -> dict[str, Tensor]:
    """One set of detections from two views of the same image (`b` already mapped onto `a`'s geometry).

    Greedy one-to-one matching by score (same class, IoU >= `iou`): a matched pair becomes one box, the
    score-weighted mean of the two, with the mean score (and mean mask and class probabilities); a box only one view
    saw keeps its coordinates at half its score (the other view gave it 0). Proposals of the two views are
    pooled, so background probabilities come from both.
    """
    ious = box_iou(a["boxes"], b["boxes"]) if len(a["boxes"]) and len(b["boxes"]) else None
    pairs, used_b = [], set()
    if ious is not None:
        ious[a["labels"][:, None] != b["labels"][None, :]] = 0.0
        for i in torch.argsort(a["scores"], descending=True).tolist():
            candidates = [(v, j) for j, v in enumerate(ious[i].tolist()) if v >= iou and j not in used_b]
            if candidates:
                j = max(candidates)[1]
                pairs.append((i, j))
                used_b.add(j)
    ia = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=a["boxes"].device)
    ib = torch.tensor([j for _, j in pairs], dtype=torch.long, device=a["boxes"].device)
    only_a = _complement(ia, len(a["boxes"]))
    only_b = _complement(ib, len(b["boxes"]))
    sa, sb = a["scores"][ia], b["scores"][ib]
    weights = torch.stack([sa, sb]) / (sa + sb).clamp_min(1e-6)
    fused = {
        "boxes": torch.cat(
            [
                weights[0, :, None] * a["boxes"][ia] + weights[1, :, None] * b["boxes"][ib],
                a["boxes"][only_a],
                b["boxes"][only_b],
            ]
        ),
        "labels": torch.cat([a["labels"][ia], a["labels"][only_a], b["labels"][only_b]]),
    }
    for key in ("scores", "foreground"):  # a view that missed the box gave it 0
        if key in a:
            fused[key] = torch.cat([(a[key][ia] + b[key][ib]) / 2, a[key][only_a] / 2, b[key][only_b] / 2])
    for key in ("masks", "class_probs"):  # a pair averages its mask and class probabilities
        if key in a:
            fused[key] = torch.cat([(a[key][ia] + b[key][ib]) / 2, a[key][only_a], b[key][only_b]])
    if "proposal_boxes" in a:
        fused.update({k: torch.cat([a[k], b[k]]) for k in ("proposal_boxes", "proposal_background")})
        fused["image_size"] = a["image_size"]
    order = torch.argsort(fused["scores"], descending=True)
    return {k: (v[order] if k not in BACKGROUND_KEYS else v) for k, v in fused.items()}


def _complement(index: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=index.device)
    mask[index] = False
    return torch.nonzero(mask).flatten()


def _roi_softmax(teacher: nn.Module, features, boxes: list[Tensor], image_sizes) -> list[Tensor]:
    """The teacher ROI head's class distribution (background first) of each box, image by image."""
    heads = teacher.roi_heads
    logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, image_sizes)))
    return list(torch.softmax(logits, -1).split([len(b) for b in boxes]))


def _teacher_forward(
    teacher: nn.Module, images: list[Tensor], background: bool, class_probs: bool = False
) -> list[dict[str, Tensor]]:
    """torchvision's GeneralizedRCNN inference, keeping the proposals when `background` is asked for and the
    class distribution of each detection when `class_probs` is."""
    if not (background or class_probs):
        return teacher(images)
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    image_list, _ = teacher.transform(images)
    features = teacher.backbone(image_list.tensors)
    proposals, _ = teacher.rpn(image_list, features)
    detections, _ = teacher.roi_heads(features, proposals, image_list.image_sizes)
    if class_probs:  # read on the detected (regressed) box, the box the student is taught
        boxes = [d["boxes"] for d in detections]
        for detection, probs in zip(detections, _roi_softmax(teacher, features, boxes, image_list.image_sizes)):
            detection["class_probs"], detection["foreground"] = probs, 1.0 - probs[:, 0]
    detections = teacher.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    if not background:
        return detections
    proposals = [p[:BACKGROUND_PROPOSALS] for p in proposals]
    background_probs = [p[:, 0] for p in _roi_softmax(teacher, features, proposals, image_list.image_sizes)]
    for detection, boxes, probs, size, original in zip(
        detections, proposals, background_probs, image_list.image_sizes, original_sizes
    ):
        detection["proposal_boxes"] = resize_boxes(boxes[: len(probs)], size, original)
        detection["proposal_background"] = probs
        detection["image_size"] = torch.tensor(original, device=probs.device)
    return detections


def teacher_detections(
    teacher: nn.Module,
    weak_images: list[Tensor],
    tta: str = "none",
    background: bool = False,
    class_probs: bool = False,
) -> list[dict[str, Tensor]]:
    """The teacher's eval-mode detections on weakly augmented images, before any pseudo-label threshold.

    With `tta="flip"` the teacher also sees each image's mirror (one batch) and the two views are fused.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"teacher TTA must be one of {TTA_MODES}, got {tta!r}")
    teacher.eval()
    with torch.inference_mode():
        if tta == "none":
            return _teacher_forward(teacher, weak_images, background, class_probs)
        n = len(weak_images)
        both_views = weak_images + [image.flip(-1) for image in weak_images]
        outputs = _teacher_forward(teacher, both_views, background, class_probs)
        return [fuse_views(outputs[i], _mirror(outputs[n + i], weak_images[i].shape[-1])) for i in range(n)]


def filter_detections(
    output: dict[str, Tensor],
    score_threshold: Threshold,
    mask_threshold: float = 0.5,
    prior: DensityPrior | None = None,
    cut_score: str = "class",
) -> dict[str, Tensor]:
    """Keep detections with score >= threshold (within the density prior's caps and floor, when given);
    masks (probabilities) become binary at `mask_threshold`; teacher proposals pass through.

    `cut_score="foreground"` cuts on the teacher's foreground probability instead of its top class's score
    (an object it is sure of but torn between two classes passes), then keeps one box per object.
    The result holds ordinary tensors (cloned out of inference mode) so it can be a training target.
    """
    if cut_score not in CUT_SCORES:
        raise ValueError(f"the cut reads one of {CUT_SCORES}, got {cut_score!r}")
    scores = output["foreground"] if cut_score == "foreground" else output["scores"]
    if isinstance(score_threshold, Tensor):
        score_threshold = score_threshold.to(scores.device)[output["labels"]]
    keep = scores >= score_threshold
    if prior is not None:
        keep = _within_prior(output["labels"], scores, keep, prior)
    if cut_score == "foreground":
        keep = _one_box_per_object(output["boxes"], output["scores"], keep)
    target = {k: output[k][keep].clone() for k in ("boxes", "labels", "scores", "class_probs") if k in output}
    if "masks" in output:
        target["masks"] = (output["masks"][keep, 0] >= mask_threshold).to(torch.uint8)
    target.update({k: output[k].clone() for k in BACKGROUND_KEYS if k in output})
    return target


def _one_box_per_object(boxes: Tensor, scores: Tensor, passed: Tensor) -> Tensor:
    """Class-agnostic NMS among the boxes that passed: where boxes of several classes cover one object, the
    most confident class's box stays."""
    index = torch.nonzero(passed).flatten()
    keep = torch.zeros_like(passed)
    keep[index[nms(boxes[index], scores[index], FOREGROUND_NMS_IOU)]] = True
    return keep


def _within_prior(labels: Tensor, scores: Tensor, passed: Tensor, prior: DensityPrior) -> Tensor:
    """The density prior on one image's detections: per-class caps on what passed the cut, then the floor."""
    caps = prior.caps().to(labels.device)
    keep = torch.zeros_like(passed)
    taken = torch.zeros_like(caps)
    order = torch.argsort(scores, descending=True).tolist()
    for i in order:  # the cut's boxes first, most confident first, up to each class's cap
        c = int(labels[i])
        if passed[i] and taken[c] < caps[c]:
            keep[i], taken[c] = True, taken[c] + 1
    for i in order:  # then the floor: the most confident of the rest, still within the caps
        if int(keep.sum()) >= prior.floor_count() or scores[i] < prior.min_score:
            break
        c = int(labels[i])
        if not keep[i] and taken[c] < caps[c]:
            keep[i], taken[c] = True, taken[c] + 1
    return keep


def pseudo_label(
    teacher: nn.Module, weak_images: list[Tensor], score_threshold: Threshold, mask_threshold: float = 0.5
) -> list[dict[str, Tensor]]:
    """Teacher predictions on weakly augmented images, thresholded; an image may get no box at all."""
    return [filter_detections(o, score_threshold, mask_threshold) for o in teacher_detections(teacher, weak_images)]


@dataclass(frozen=True)
class PseudoLabelPolicy:
    """How the teacher's view of an unlabeled image becomes the student's target (the `ssl.*` remedies)."""

    tta: str = "none"
    background: bool = False  # carry the teacher's proposals and background probabilities to the student
    prior: DensityPrior | None = None
    # `soft`: each pseudo-box carries the teacher's class distribution of it (the student's soft target);
    # `soft_foreground`: the same without its background mass, renormalized over the object classes;
    # `soft_split`: `soft_foreground` where the other classes hold >= `split_share` of that mass, else the
    # box's label one-hot
    class_target: str = "hard"
    split_share: float = 0.1
    cut_score: str = "class"  # `foreground`: the cut reads the teacher's foreground probability

    @property
    def soft_classes(self) -> bool:
        return self.class_target != "hard"

    def detect(self, teacher: nn.Module, weak_images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Every detection of the teacher on the weak views (fused over views with TTA)."""
        class_probs = self.soft_classes or self.cut_score == "foreground"
        return teacher_detections(teacher, weak_images, self.tta, self.background, class_probs)

    def keep(self, detections: list[dict[str, Tensor]], threshold: Threshold) -> list[dict[str, Tensor]]:
        """The pseudo-labels: the score cut, within the density prior when there is one."""
        kept = [filter_detections(d, threshold, prior=self.prior, cut_score=self.cut_score) for d in detections]
        for target in kept:
            if not self.soft_classes:  # read for the cut only: the student is taught the top class
                target.pop("class_probs", None)
            else:
                target["class_probs"] = class_targets(
                    target["class_probs"], target["labels"], self.class_target, self.split_share
                )
        return kept
