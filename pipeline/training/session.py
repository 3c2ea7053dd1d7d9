"""The names this module held before it was split by concern, for the scripts that import them from here:
setup (device, models, optimizer) in `setup`, checkpoint and metrics files in `checkpoints`, pseudo-label
statistics in `pseudo_stats`, batches in `feed`, the pseudo-label policy in `pseudo`."""

from pipeline.training.checkpoints import (
    CHECKPOINT_NAME,
    checkpoint_state,
    load_checkpoint,
    load_part,
    save_checkpoint,
    write_metrics,
)
from pipeline.training.feed import labeled_batch, to_device
from pipeline.training.pseudo import pseudo_label_policy
from pipeline.training.pseudo_stats import (
    PseudoLabelStats,
    labeled_boxes_per_image,
    labeled_class_histogram,
)
from pipeline.training.setup import build_optimizer, build_student_teacher, resolve_device

__all__ = [
    "CHECKPOINT_NAME",
    "PseudoLabelStats",
    "build_optimizer",
    "build_student_teacher",
    "checkpoint_state",
    "labeled_batch",
    "labeled_boxes_per_image",
    "labeled_class_histogram",
    "load_checkpoint",
    "load_part",
    "pseudo_label_policy",
    "resolve_device",
    "save_checkpoint",
    "to_device",
    "write_metrics",
]
