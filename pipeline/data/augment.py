"""Weak and strong views (torchvision.transforms.v2 + tv_tensors, so boxes and masks move with the image).

weak   = horizontal flip (the multi-scale resize happens inside the detector, see `model.min_size`)
strong = the weak view + photometric noise and erasing only, so the weak view's boxes stay valid
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2


def weak_transform(flip_prob: float = 0.5) -> v2.Transform:
    """On uint8 images and tv_tensors targets; models take `to_float` of the result."""
    return v2.RandomHorizontalFlip(flip_prob)


def strong_transform() -> v2.Transform:
    """Unbiased Teacher's strong augmentation, on a uint8 (or [0, 1] float) CHW image."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
            v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
            v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
        ]
    )


def strong_view(weak_image: Tensor, transform: v2.Transform | None = None) -> Tensor:
    """Photometric/erasing on the image only: geometry is untouched, so targets need no transform."""
    return (transform or strong_transform())(torch.as_tensor(weak_image).as_subclass(Tensor))


def to_float(image: Tensor) -> Tensor:
    """uint8 image -> float in [0, 1], the detectors' input."""
    return v2.functional.to_dtype(image.as_subclass(Tensor), torch.float32, scale=True)


def to_model_target(target: dict) -> dict[str, Tensor]:
    """tv_tensors -> the plain tensors torchvision detectors expect."""
    out = {"boxes": target["boxes"].as_subclass(Tensor).float(), "labels": target["labels"]}
    if "masks" in target:
        out["masks"] = target["masks"].as_subclass(Tensor)
    return out


def make_target(boxes: Tensor, labels: Tensor, size: tuple[int, int], masks: Tensor | None = None) -> dict:
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size), "labels": labels}
    if masks is not None:
        target["masks"] = tv_tensors.Mask(masks)
    return target
