"""The training loop of both runners: pseudo-label -> student step -> after-step hooks.

Everything around the step is a `Hook` (pipeline/training/hooks.py: teacher refresh, thresholds, logging,
the divergence guard, evaluation, metrics, tracking, checkpoints, the target AP; the Ray runner adds its
teacher publisher), called in list order, the way Detectron2's hooks and mmengine's hooks are. A runner
brings a `Feed` (pipeline/training/feed.py) that hands out batches; `PseudoLabels` turns the unlabeled
one into the student's pseudo-labeled batch. On Ray every train worker runs the loop; decisions that end
it are taken by all ranks together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.ranks import all_ranks_agree
from models.unbiased_teacher import Batch, StepResult, in_mutual_learning, unbiased_teacher_step
from pipeline.data.schema import UNLABELED_DIR
from pipeline.training.feed import Feed, to_device
from pipeline.training.pseudo import PseudoLabels
from pipeline.training.state import RunState


class Hook:
    """Something done around the steps of a run; override what is needed (`run.step` counts steps done)."""

    def before_run(self, run: RunState) -> None:
        """Once, before the first step (of this attempt: a resumed run starts at its checkpoint's step)."""

    def before_step(self, run: RunState) -> None:
        """Before the batches of step `run.step` + 1 are taken."""

    def after_step(self, run: RunState) -> None:
        """After the student's update; `run.last_result` holds its losses. Set `run.stop_reason` (a
        failure) or `run.target_reached` to end the run: the hooks after this one are then not called."""

    def after_run(self, run: RunState) -> None:
        """Once at the end, however the run ended (every hook is called)."""


class Loop:
    """One run's steps from `run.step` to `train.steps` (or an early stop).

    Args:
        run: the run's state (models, optimizer, counters), restored already when resuming.
        feed: the runner's batches.
        pseudo_labels: turns an unlabeled batch into the pseudo-labeled one.
        hooks: called in this order at each point of the run.
    """

    def __init__(self, run: RunState, feed: Feed, pseudo_labels: PseudoLabels, hooks: list[Hook]):
        self.state, self.feed, self.pseudo_labels, self.hooks = run, feed, pseudo_labels, hooks

    def run(self) -> dict[str, Any]:
        """Train until `train.steps`, or until a hook or a dry unlabeled stream stops the run.

        Returns:
            metrics.json's content on rank 0 (`stop_reason` says why a run ended early); {} on other ranks.
        """
        run, cfg = self.state, self.state.cfg
        self._call("before_run")
        while run.step < cfg.train.steps and not run.stopping:
            self._call("before_step")
            mutual = in_mutual_learning(run.step + 1, cfg.ssl.burn_in_steps)
            unlabeled = self.feed.unlabeled(run.step) if mutual else None
            pseudo = self.pseudo_labels.batch(run, unlabeled) if unlabeled is not None else None
            if all_ranks_agree(mutual and pseudo is None, run.device, any_rank=True):  # all ranks stop together
                run.stop_reason = (
                    f"{Path(cfg.data.prepared) / UNLABELED_DIR}: the unlabeled stream ran dry at "
                    f"step {run.step} of {cfg.train.steps} (corrupt_rows_skipped in metrics.json)"
                )
                break
            run.last_result = self._step(self.feed.labeled(), pseudo)
            self._call("after_step")
        self._call("after_run")
        return run.metrics

    def _step(self, labeled: Batch, pseudo_labeled: Batch | None) -> StepResult:
        run, ssl, train = self.state, self.state.cfg.ssl, self.state.cfg.train
        if pseudo_labeled is not None:
            pseudo_labeled = to_device(pseudo_labeled, run.device)
        result = unbiased_teacher_step(
            run.student,
            run.optimizer,
            to_device(labeled, run.device),
            pseudo_labeled,
            ssl.unsup_loss_weight,
            ssl.unsup_mask_loss,
            train.grad_clip_norm,
        )
        run.step += 1
        run.skipped_steps += int(result.skipped)
        run.scheduler.step()
        return result

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self.state)
            if point == "after_step" and self.state.stopping:
                return
