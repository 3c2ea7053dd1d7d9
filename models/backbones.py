"""Detector backbones (body + FPN): torchvision ResNet-50 / MobileNetV3, timm EfficientNet-Lite0, a tiny CPU net.

Pretrained bodies get frozen BatchNorm and a frozen stem + first stage (Detectron2's defaults for
loaded weights). Random bodies train their norms: frozen BatchNorm on a random ResNet-50 overflows.
"""

from __future__ import annotations

from collections import OrderedDict

import timm
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

BACKBONES = ("resnet50_fpn", "mobilenet_v3_fpn", "efficientnet_lite0_fpn", "tiny")
# Backbones whose detectors get small ROI heads: torchvision's 1024-wide MLP and 4x256 mask convs
# would cost more than the body itself.
SMALL_HEAD_BACKBONES = ("efficientnet_lite0_fpn", "tiny")
DEFAULT_ANCHORS = {
    "resnet50_fpn": [[32], [64], [128], [256], [512]],
    "mobilenet_v3_fpn": [[32, 64, 128, 256, 512]] * 3,
    "efficientnet_lite0_fpn": [[16, 24], [32, 48], [64, 96], [128, 192]],
    "tiny": [[16, 24], [32, 48], [64, 96]],
}
# The EfficientNet-Lite0 weights were ported from TensorFlow and expect inputs scaled to [-1, 1];
# with ImageNet's mean/std their features are markedly less coherent. Others use torchvision's default.
IMAGE_NORMALIZATION = {"efficientnet_lite0_fpn": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
EFFICIENTNET_FEATURES = (2, 3, 4)  # strides 8, 16, 32
EFFICIENTNET_FPN_CHANNELS = 96


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
            stem=_conv_block(3, 32),
            stage2=_conv_block(32, 64),
            stage3=_conv_block(64, 128),
            stage4=_conv_block(128, 192),
        )
    )
    return BackboneWithFPN(body, {"stage3": "0", "stage4": "1"}, [128, 192], out_channels)


class TimmFPN(nn.Module):
    """A timm `features_only` body under torchvision's FPN, shaped like `BackboneWithFPN`."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def efficientnet_lite0_fpn(frozen: bool, out_channels: int = EFFICIENTNET_FPN_CHANNELS) -> TimmFPN:
    body = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=EFFICIENTNET_FEATURES
    )
    if frozen:
        body = freeze_batch_norm_2d(body)
        for part in (body.conv_stem, body.bn1, body.blocks[0], body.blocks[1]):  # up to stride 4, as Detectron2
            part.requires_grad_(False)
    return TimmFPN(body, out_channels)


def build_backbone(name: str, frozen: bool) -> nn.Module:
    """The named backbone with random weights; `frozen` prepares it for loaded weights (see module doc)."""
    norm = misc_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if name == "resnet50_fpn":
        return resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=norm, trainable_layers=3 if frozen else 5
        )
    if name == "mobilenet_v3_fpn":
        return mobilenet_backbone(
            backbone_name="mobilenet_v3_large",
            weights=None,
            fpn=True,
            norm_layer=norm,
            trainable_layers=3 if frozen else 6,
        )
    if name == "efficientnet_lite0_fpn":
        return efficientnet_lite0_fpn(frozen)
    if name == "tiny":
        return tiny_backbone()
    raise ValueError(f"model.backbone must be one of {BACKBONES}, got {name!r}")
