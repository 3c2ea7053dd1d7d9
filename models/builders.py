"""Detector builders: torchvision Faster R-CNN / Mask R-CNN with a focal-loss ROI head.

Models start from random weights (`weights=None`); `weights_path` loads a local file with
`weights_only=True` (a detector state dict, one of our checkpoints, or backbone-only weights).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_ops

from models.losses import FocalRoIHeads

ARCHS = ("faster_rcnn", "mask_rcnn")
BACKBONES = ("resnet50_fpn", "mobilenet_v3_fpn", "tiny")
ASPECT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_ANCHORS = {
    "resnet50_fpn": [[32], [64], [128], [256], [512]],
    "mobilenet_v3_fpn": [[32, 64, 128, 256, 512]] * 3,
    "tiny": [[16, 24], [32, 48], [64, 96]],
}


class WeightsFileError(ValueError):
    """A local weights file that cannot be used; the message names the file and the problem."""


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
    )


def tiny_backbone(out_channels: int = 96) -> BackboneWithFPN:
    """Four stride-2 conv stages (GroupNorm: no running buffers, safe under EMA, DDP and tiny batches)."""
    body = nn.Sequential(
        OrderedDict(
            stem=_conv_block(3, 32), stage2=_conv_block(32, 64), stage3=_conv_block(64, 128), stage4=_conv_block(128, 192)
        )
    )
    return BackboneWithFPN(body, {"stage3": "0", "stage4": "1"}, [128, 192], out_channels)


def _backbone(name: str, pretrained: bool) -> nn.Module:
    # Random init trains its norms; frozen BatchNorm on a random ResNet-50 overflows (DESIGN field notes).
    norm = misc_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name == "resnet50_fpn":
        return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=norm,
                                   trainable_layers=3 if pretrained else 5)
    if name == "mobilenet_v3_fpn":
        return mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=norm,
                                  trainable_layers=3 if pretrained else 6)
    if name == "tiny":
        return tiny_backbone()
    raise ValueError(f"model.backbone must be one of {BACKBONES}, got {name!r}")


def _roi_heads(base: nn.Module, num_classes: int, focal_gamma: float, tiny: bool, rois_per_image: int) -> FocalRoIHeads:
    box_head, box_predictor = base.box_head, base.box_predictor
    mask = {}
    if base.has_mask():
        mask = dict(mask_roi_pool=base.mask_roi_pool, mask_head=base.mask_head, mask_predictor=base.mask_predictor)
    if tiny:  # torchvision's 1024-wide MLP and 4x256 mask convs dwarf the tiny backbone
        box_head, box_predictor = TwoMLPHead(box_head.fc6.in_features, 256), FastRCNNPredictor(256, num_classes)
        if mask:
            in_ch = mask["mask_head"][0][0].in_channels
            mask["mask_head"] = MaskRCNNHeads(in_ch, [128, 128, 128, 128], 1)
            mask["mask_predictor"] = MaskRCNNPredictor(128, 128, num_classes)
    return FocalRoIHeads(
        base.box_roi_pool, box_head, box_predictor,
        0.5, 0.5, rois_per_image, 0.25, None,  # fg/bg IoU, sampled ROIs, positive fraction, box coder weights
        base.score_thresh, base.nms_thresh, base.detections_per_img,
        focal_gamma=focal_gamma, **mask,
    )


def build_detector(
    num_classes: int,
    *,
    arch: str = "faster_rcnn",
    backbone: str = "tiny",
    weights_path: str | None = None,
    min_size: list[int] | tuple[int, ...] = (320,),
    max_size: int = 512,
    roi_loss: str = "focal",
    focal_gamma: float = 1.5,
    anchor_sizes: list[list[int]] | None = None,
    detections_per_image: int = 100,
    rois_per_image: int = 512,
) -> nn.Module:
    """A torchvision detector for `num_classes` foreground classes (background is added here)."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    sizes = anchor_sizes or DEFAULT_ANCHORS[backbone]
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (ASPECT_RATIOS,) * len(sizes))
    detector_cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    model = detector_cls(
        _backbone(backbone, pretrained=weights_path is not None),
        num_classes=num_classes + 1,
        min_size=tuple(min_size),
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_detections_per_img=detections_per_image,
    )
    gamma = focal_gamma if roi_loss == "focal" else 0.0  # focal loss at gamma 0 is cross-entropy
    model.roi_heads = _roi_heads(model.roi_heads, num_classes + 1, gamma, tiny=backbone == "tiny",
                                 rois_per_image=rois_per_image)
    if weights_path:
        load_weights(model, weights_path)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a detector state dict, one of our checkpoints (its teacher), or backbone-only weights."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: weights file not found") from None
    except Exception as exc:  # pickle/zip errors: the file is not a torch weights file
        raise WeightsFileError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        state = state["teacher"]
    if not isinstance(state, dict) or not state:
        raise WeightsFileError(f"{path}: expected a state dict (name -> tensor)")
    target = model if any(k.startswith("backbone.") for k in state) else model.backbone.body
    own = target.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise WeightsFileError(f"{path}: no parameter names match this {type(model).__name__} or its backbone")
    for key, value in matched.items():
        if value.shape != own[key].shape:
            raise WeightsFileError(
                f"{path}: shape mismatch at {key}: file has {tuple(value.shape)}, model has {tuple(own[key].shape)}"
                " (different model.arch/backbone or number of classes?)"
            )
    target.load_state_dict(matched, strict=False)
