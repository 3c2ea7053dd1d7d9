"""Detector builders: torchvision Faster R-CNN / Mask R-CNN with a focal-loss ROI head.

Weights: random (`pretrained="none"`), ImageNet or COCO (`models.pretrained`, found locally, never
downloaded), or a local file (`weights_path`, loaded with `weights_only=True`: a detector state dict, one
of our checkpoints, or backbone-only weights), which wins when both are given.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from models.backbones import DEFAULT_ANCHORS, IMAGE_NORMALIZATION, SMALL_HEAD_BACKBONES, build_backbone
from models.losses import FocalRoIHeads
from models.pretrained import load_pretrained
from models.torch_files import read_tensor_file
from models.weights_report import LoadReport, PartialWeightsError, check, compare

ARCHS = ("faster_rcnn", "mask_rcnn")
ASPECT_RATIOS = (0.5, 1.0, 2.0)


class WeightsFileError(ValueError):
    """A local weights file that cannot be used; the message names the file and the problem."""


def _roi_heads(
    base: nn.Module, num_classes: int, focal_gamma: float, small: bool, rois_per_image: int
) -> FocalRoIHeads:
    box_head, box_predictor = base.box_head, base.box_predictor
    mask = {}
    if base.has_mask():
        mask = dict(mask_roi_pool=base.mask_roi_pool, mask_head=base.mask_head, mask_predictor=base.mask_predictor)
    if small:
        box_head, box_predictor = TwoMLPHead(box_head.fc6.in_features, 256), FastRCNNPredictor(256, num_classes)
        if mask:
            in_ch = mask["mask_head"][0][0].in_channels
            mask["mask_head"] = MaskRCNNHeads(in_ch, [128, 128, 128, 128], 1)
            mask["mask_predictor"] = MaskRCNNPredictor(128, 128, num_classes)
    return FocalRoIHeads(
        base.box_roi_pool,
        box_head,
        box_predictor,
        0.5,
        0.5,
        rois_per_image,
        0.25,
        None,  # fg/bg IoU, sampled ROIs, positive fraction, box coder weights
        base.score_thresh,
        base.nms_thresh,
        base.detections_per_img,
        focal_gamma=focal_gamma,
        **mask,
    )


def build_detector(
    num_classes: int,
    *,
    arch: str = "faster_rcnn",
    backbone: str = "tiny",
    pretrained: str = "none",
    weights_path: str | None = None,
    init_weights: bool = True,
    min_size: list[int] | tuple[int, ...] = (320,),
    max_size: int = 512,
    roi_loss: str = "focal",
    focal_gamma: float = 1.5,
    anchor_sizes: list[list[int]] | None = None,
    detections_per_image: int = 100,
    rois_per_image: int = 512,
    allow_partial_weights: bool = False,
) -> nn.Module:
    """A torchvision detector for `num_classes` foreground classes (background is added here).

    `init_weights=False` builds the same structure (frozen norms included) without reading any weights:
    for a copy that receives a trained state dict, such as a labeler actor's teacher.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    sizes = anchor_sizes or DEFAULT_ANCHORS[backbone]
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (ASPECT_RATIOS,) * len(sizes))
    detector_cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    mean, std = IMAGE_NORMALIZATION.get(backbone, (None, None))
    model = detector_cls(
        build_backbone(backbone, frozen=pretrained != "none" or weights_path is not None),
        num_classes=num_classes + 1,
        min_size=tuple(min_size),
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_detections_per_img=detections_per_image,
        image_mean=mean,
        image_std=std,
    )
    gamma = focal_gamma if roi_loss == "focal" else 0.0  # focal loss at gamma 0 is cross-entropy
    model.roi_heads = _roi_heads(
        model.roi_heads, num_classes + 1, gamma, small=backbone in SMALL_HEAD_BACKBONES, rois_per_image=rois_per_image
    )
    if init_weights and weights_path:
        load_weights(model, weights_path, allow_partial_weights)
    elif init_weights and pretrained != "none":
        load_pretrained(model, backbone, pretrained)
    return model


def load_weights(model: nn.Module, path: str | Path, allow_partial: bool = False) -> LoadReport:
    """Load a detector state dict, one of our checkpoints (its teacher), or backbone-only weights; a load
    that fills less than most of the model is refused with its counts unless `allow_partial`."""
    state = read_tensor_file(path, WeightsFileError, "weights file")
    source = str(path)
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        state, source = state["teacher"], f"{path} (teacher)"
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise WeightsFileError(f"{path}: expected a state dict (name -> tensor)")
    whole = any(k.startswith("backbone.") for k in state)
    target = model if whole else model.backbone.body
    own = target.state_dict()
    try:
        report = check(compare(own, state, source, "detector" if whole else "backbone"), allow_partial)
    except PartialWeightsError as exc:
        raise WeightsFileError(str(exc)) from None
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    target.load_state_dict(usable, strict=False)
    return report
