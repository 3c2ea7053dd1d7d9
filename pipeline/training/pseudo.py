"""The one place where the teacher's detections become the student's pseudo-labeled batch: the score
threshold is fitted on them (rank 0, which publishes it), the pseudo-label policy keeps its boxes, and
the statistics count them against the held-aside labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.pseudo_labels import DensityPrior, PseudoLabelPolicy
from models.unbiased_teacher import Batch, without_scores
from pipeline.config import Config
from pipeline.training.feed import UnlabeledBatch
from pipeline.training.pseudo_stats import labeled_boxes_per_image

if TYPE_CHECKING:
    from pipeline.training.state import RunState


def pseudo_label_policy(cfg: Config, num_classes: int) -> PseudoLabelPolicy:
    """The `ssl.*` remedies as one policy, the same on both runners."""
    ssl = cfg.ssl
    prior = None
    if ssl.density_prior is not None:
        per_class = labeled_boxes_per_image(cfg.data.prepared, num_classes)
        prior = DensityPrior(per_class, ssl.density_prior, ssl.density_floor, ssl.density_min_score)
    background = ssl.unsup_background_weight == "teacher"
    return PseudoLabelPolicy(
        ssl.teacher_tta,
        background,
        prior,
        class_target=ssl.unsup_class_target,
        split_share=ssl.class_split_share,
        cut_score=ssl.cut_score,
    )


class PseudoLabels:
    """Unlabeled batch -> the student's pseudo-labeled batch, with the run's thresholds and statistics.

    Args:
        policy: how detections are kept (`pseudo_label_policy`); needed when a feed hands out detections
            only, as the local one does (on Ray the labelers keep boxes with the same policy).
    """

    def __init__(self, policy: PseudoLabelPolicy | None = None):
        self.policy = policy

    def batch(self, run: "RunState", unlabeled: UnlabeledBatch) -> Batch:
        """Strong views with the kept boxes as targets; the kept boxes on the weak views are kept for the picture."""
        if run.rank == 0:  # rank 0 fits the thresholds it publishes
            run.scores.observe(unlabeled.detections)
        kept = unlabeled.kept
        if kept is None:
            kept = self.policy.keep(unlabeled.detections, run.scores.threshold)
        for version in unlabeled.teacher_versions or ():
            run.stats.add_staleness(run.step - version)
        for target, held_aside in zip(kept, unlabeled.held_aside):
            run.stats.add(target, held_aside)
        run.last_pseudo = (unlabeled.weak, kept)
        return Batch(unlabeled.strong, [without_scores(t) for t in kept])
