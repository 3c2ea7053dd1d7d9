"""Losses of the Unbiased Teacher: focal ROI classification and the supervised/unsupervised split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.ops import box_iou

# Terms that pseudo-labels supervise; box regression on pseudo-boxes is dropped (the paper's choice:
# a confident class score says little about box quality).
UNSUPERVISED_TERMS = ("loss_objectness", "loss_classifier")
MASK_TERM = "loss_mask"


# A student background proposal takes the teacher's background probability of the teacher proposal it
# overlaps most, at this IoU or more; below it the teacher saw nothing there and it stays certain background.
BACKGROUND_MATCH_IOU = 0.5


def softmax_focal_loss(logits: Tensor, labels: Tensor, gamma: float = 1.5, weights: Tensor | None = None) -> Tensor:
    """Multi-class focal loss: sum(w * (1 - p_t)^gamma * CE) / num_rois, no alpha (gamma 0 == cross-entropy);
    `weights` default to 1 per ROI."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1.0 - p_t) ** gamma * ce
    return (loss if weights is None else weights * loss).sum() / labels.numel()


def soft_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 1.5, weights: Tensor | None = None) -> Tensor:
    """`softmax_focal_loss` against class distributions q (rows of `targets`) instead of labels: per ROI
    (1 - p_t)^gamma * CE(q, p) with p_t = sum_k q_k p_k. A one-hot row is the hard focal loss of its label.
    On a soft row the focusing factor is held constant (no gradient), so the loss is smallest at p = q:
    the student learns the teacher's distribution, neither flattened nor sharpened. (Focusing each class
    term, sum_k q_k (1 - p_k)^gamma (-log p_k), is smallest at a flatter p: q = 0.95 / 0.05 gives
    p = 0.79 / 0.21 at gamma 1.5, so an EMA teacher taught that way loses score every round.)"""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, -1)
    focus = (1.0 - (targets * log_p.exp()).sum(-1)).clamp_min(0.0) ** gamma
    one_hot = targets.amax(-1) >= 1.0
    focus = torch.where(one_hot, focus, focus.detach())
    loss = focus * (targets * -log_p).sum(-1)
    return (loss if weights is None else weights * loss).sum() / len(logits)


def soft_class_targets(labels: list[Tensor], matched_idxs: list[Tensor], targets: list[dict], classes: int) -> Tensor:
    """Each sampled ROI's class target: its label one-hot, or for a foreground ROI the class distribution
    the teacher gave the pseudo-box it was matched to (`target["class_probs"]`)."""
    rows = []
    for lab, matched, target in zip(labels, matched_idxs, targets):
        row = F.one_hot(lab, classes).to(target["class_probs"].dtype)
        foreground = lab > 0
        if foreground.any():
            row[foreground] = target["class_probs"][matched[foreground]].to(row.device)
        rows.append(row)
    return torch.cat(rows)


def background_weights(
    proposals: Tensor, labels: Tensor, image_shape: tuple[int, int], target: dict[str, Tensor]
) -> Tensor:
    """Per-ROI weights of one image's sampled proposals under soft background weighting.

    Foreground ROIs weigh 1. A background ROI's reliability is the teacher's background probability of the
    teacher proposal it overlaps most (`target["proposal_boxes"]`, in the `target["image_size"]` frame), or
    1 where the teacher proposed nothing there. Background weights are the reliabilities rescaled to sum to
    the number of background ROIs, so the background's share of the loss is unchanged: a background ROI the
    teacher itself calls likely foreground (an object the score cut dropped) teaches little.
    """
    weights = torch.ones(len(labels), device=proposals.device)
    background = labels == 0
    teacher_boxes = target["proposal_boxes"]
    if not background.any() or len(teacher_boxes) == 0:
        return weights
    height, width = target["image_size"].tolist()
    scale = torch.tensor(
        [image_shape[1] / width, image_shape[0] / height] * 2, device=teacher_boxes.device, dtype=teacher_boxes.dtype
    )
    best_iou, best = box_iou(proposals[background], teacher_boxes * scale).max(dim=1)
    reliability = torch.where(
        best_iou >= BACKGROUND_MATCH_IOU, target["proposal_background"][best], torch.ones_like(best_iou)
    )
    weights[background] = reliability * background.sum() / reliability.sum().clamp_min(1e-6)
    return weights


class FocalRoIHeads(RoIHeads):
    """torchvision's RoIHeads with the ROI classifier trained by softmax focal loss.

    Inference is untouched; only the training branch is rewritten, because torchvision computes
    its cross-entropy inside `forward` with no hook to swap it.
    """

    def __init__(self, *args, focal_gamma: float = 1.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.focal_gamma = focal_gamma

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        weights = None
        if targets is not None and all("proposal_boxes" in t for t in targets):  # soft background weighting
            weights = torch.cat(
                [background_weights(p, lab, s, t) for p, lab, s, t in zip(proposals, labels, image_shapes, targets)]
            )
        if targets is not None and all("class_probs" in t for t in targets):  # soft class targets
            soft = soft_class_targets(labels, matched_idxs, targets, class_logits.shape[-1])
            loss_classifier = soft_focal_loss(class_logits, soft, self.focal_gamma, weights)
        else:
            loss_classifier = softmax_focal_loss(class_logits, torch.cat(labels), self.focal_gamma, weights)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            losses["loss_mask"] = self._mask_loss(features, proposals, image_shapes, targets, labels, matched_idxs)
        return [], losses

    def _mask_loss(self, features, proposals, image_shapes, targets, labels, matched_idxs) -> Tensor:
        positives = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
        pos_matched_idxs = [m[pos] for m, pos in zip(matched_idxs, positives)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        return maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched_idxs)


def unsupervised_loss(losses: dict[str, Tensor], use_mask: bool = True) -> Tensor:
    """Pseudo-label loss: RPN objectness + ROI classification (+ mask); other terms kept at weight 0.

    Multiplying the dropped terms by zero (instead of leaving them out) keeps every parameter in the
    autograd graph, which DDP requires.
    """
    kept = set(UNSUPERVISED_TERMS) | ({MASK_TERM} if use_mask else set())
    return sum(v if k in kept else v * 0.0 for k, v in losses.items())
