"""What a runner's feed hands the training loop (pipeline/training/loop.py): batches, nothing else.

The labeled batch is both views of every labeled image with its target. The unlabeled batch is the weak
views (the teacher's input), the strong views (the student's), the teacher's detections before any
threshold, and the held-aside labels of the images that have them; on Ray it also carries the labelers'
kept boxes and the teacher version that labelled each row. What becomes a pseudo-label, and what is
counted, is decided in one place: `pipeline.training.pseudo.PseudoLabels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from models.unbiased_teacher import Batch
from pipeline.data.augment import to_float

Targets = list[dict[str, Tensor]]


@dataclass
class UnlabeledBatch:
    weak: list[Tensor]  # float images in [0, 1]
    strong: list[Tensor]
    detections: Targets  # the teacher's boxes, labels and scores before thresholding
    held_aside: list[dict[str, Tensor] | None]  # an image's labels kept aside (None: it has none)
    kept: Targets | None = None  # already thresholded by the labelers (Ray); None: threshold `detections`
    teacher_versions: list[int] | None = None  # the student step of the teacher that labelled each image


class Feed(Protocol):
    """A runner's batches; every train worker has its own."""

    def labeled(self) -> Batch:
        """Labeled images in both views (weak views, then strong ones), each with its target."""

    def unlabeled(self, step: int) -> UnlabeledBatch | None:
        """The next unlabeled batch for student step `step` + 1; None: the stream ran dry."""

    def scalars(self) -> dict[str, float]:
        """The stream's running figures for the logs (may be empty)."""

    def summary(self) -> dict[str, Any]:
        """What metrics.json adds at the end of the run (every rank calls it)."""


def labeled_batch(samples: list[tuple[Tensor, Tensor, dict[str, Tensor]]]) -> Batch:
    """(weak view, strong view, target) triples -> both views of every image, as the reference trains them."""
    images = [to_float(weak) for weak, _, _ in samples] + [to_float(strong) for _, strong, _ in samples]
    targets = [target for _, _, target in samples]
    return Batch(images, targets + targets)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        [i.to(device, non_blocking=True) for i in batch.images],
        [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch.targets],
    )
