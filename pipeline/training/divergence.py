"""A run whose steps are mostly skipped (non-finite loss or gradient) has diverged: it stops and says so.

Every DDP rank skips the same steps (the skip decision is all-reduced), so every rank reaches the same verdict.
"""

from __future__ import annotations

from collections import deque

from pipeline.config import TrainConfig
from pipeline.training.loop import Hook
from pipeline.training.state import RunState


class SkipGuard:
    """More than `max_fraction` of the last `window` steps skipped -> a one-line reason to stop."""

    def __init__(self, max_fraction: float, window: int):
        self.max_fraction, self.recent = max_fraction, deque(maxlen=window)

    def add(self, skipped: bool) -> None:
        self.recent.append(bool(skipped))

    def verdict(self, step: int, lr: float, final: bool = False) -> str | None:
        """Judged on a full window, or at the end of a run shorter than the window."""
        seen, skipped = len(self.recent), sum(self.recent)
        if not seen or (seen < self.recent.maxlen and not final) or skipped <= self.max_fraction * seen:
            return None
        return (
            f"train.max_skipped_fraction={self.max_fraction:g}: {skipped} of the last {seen} steps were skipped "
            f"(non-finite loss or gradient), the run diverged by step {step}; lower train.lr (now {lr:g}) "
            "or ssl.unsup_loss_weight"
        )


class DivergenceGuard(Hook):
    """Ends a run whose recent steps were mostly skipped (`train.max_skipped_fraction` of `train.skip_window`)."""

    def __init__(self, train: TrainConfig):
        self.guard, self.lr = SkipGuard(train.max_skipped_fraction, train.skip_window), train.lr

    def after_step(self, run: RunState) -> None:
        self.guard.add(run.last_result.skipped)
        self._judge(run, final=False)

    def after_run(self, run: RunState) -> None:
        self._judge(run, final=True)

    def _judge(self, run: RunState, final: bool) -> None:
        reason = None if run.stop_reason else self.guard.verdict(run.step, self.lr, final)
        if reason:
            run.stop_reason, run.diverged = reason, True
