"""What a runner plugs into the one training loop, `TrainingRun.run` (pipeline/training/loop.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from models.unbiased_teacher import Batch

if TYPE_CHECKING:
    from pipeline.training.loop import TrainingRun


class Feed(Protocol):
    """What a runner plugs into `TrainingRun.run`."""

    def labeled_batch(self) -> Batch:
        """Labeled images in both views."""

    def pseudo_batch(self, run: "TrainingRun") -> Batch | None:
        """Strong views with the teacher's kept boxes (built with `run.pseudo_batch`); None: the stream ran dry."""

    def after_step(self, run: "TrainingRun") -> None:
        """E.g. publish the refreshed teacher to labeler actors."""

    def any_rank(self, flag: bool) -> bool:
        """Whether any train worker says yes (so all stop together); the flag itself in one process."""

    def checkpoint(self, run: "TrainingRun") -> None:
        """Save `run.state()` (every rank calls it; Ray Train takes rank 0's)."""

    def finish(self, run: "TrainingRun") -> dict[str, Any]:
        """The last evaluation, checkpoint and metrics.json; returns the metrics."""
