"""The class target a soft pseudo-box teaches the student, made from the teacher's class distribution of it
(`ssl.unsup_class_target`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def class_targets(class_probs: Tensor, labels: Tensor, kind: str, split_share: float) -> Tensor:
    """`soft`: the teacher's distribution as it is; `soft_foreground`: `object_class_probs`;
    `soft_split`: `split_class_probs`."""
    if kind == "soft_foreground":
        return object_class_probs(class_probs)
    if kind == "soft_split":
        return split_class_probs(class_probs, labels, split_share)
    return class_probs


def object_class_probs(class_probs: Tensor) -> Tensor:
    """A kept box taught as an object for certain, its class as the teacher's mixture: column 0
    (background) zeroed, the rest renormalized. The box passed the cut, so the teacher's doubt about it
    being an object is not taught back; its doubt between classes is."""
    objects = class_probs.clone()
    objects[:, 0] = 0.0
    return objects / objects.sum(-1, keepdim=True).clamp_min(1e-12)


def split_class_probs(class_probs: Tensor, labels: Tensor, split_share: float) -> Tensor:
    """Object-class targets that are soft only where the teacher splits a box between classes: the box's
    label one-hot where the other classes hold less than `split_share` of its object mass, the mixture
    elsewhere. A clear box is sharpened round after round, as hard targets do; a split one is not pushed
    to either side."""
    objects = object_class_probs(class_probs)
    clear = objects.gather(1, labels[:, None]).squeeze(1) > 1.0 - split_share
    return torch.where(clear[:, None], F.one_hot(labels, objects.shape[-1]).to(objects.dtype), objects)
