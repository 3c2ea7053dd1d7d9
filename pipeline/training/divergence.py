"""A run whose steps are mostly skipped (non-finite loss or gradient) has diverged: it stops and says so.

Every DDP rank skips the same steps (the skip decision is all-reduced), so every rank reaches the same verdict.
"""

from __future__ import annotations

from collections import deque


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
