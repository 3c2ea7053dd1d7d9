"""The training run around the step: the schedule, teacher refresh, logging, evaluation, checkpoints.

`TrainingRun.run` is the one loop of both runners. A runner plugs in a `Feed`: the local one its
in-process streams and teacher, the Ray one its dataset shards, weight store and `ray.train.report`
(on every train worker; rank 0 alone evaluates, checkpoints and writes metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from models.ema import unwrap
from models.unbiased_teacher import (
    Batch,
    StepResult,
    in_mutual_learning,
    refresh_teacher,
    unbiased_teacher_step,
    without_scores,
)
from pipeline.config import Config, dump_config
from pipeline.data.readers import load_categories
from pipeline.data.schema import UNLABELED_DIR
from pipeline.evaluation.evaluator import Evaluator
from pipeline.training.divergence import SkipGuard
from pipeline.training.session import (
    PseudoLabelStats,
    build_optimizer,
    build_student_teacher,
    checkpoint_state,
    labeled_class_histogram,
    load_checkpoint,
    load_part,
    resolve_device,
    to_device,
    write_metrics,
)
from pipeline.training.teacher_scores import TeacherScores

MetricsSink = Callable[[int, dict[str, float]], None]

if TYPE_CHECKING:
    from pipeline.training.feed import Feed


class TrainingRun:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        rank: int = 0,
        device: torch.device | None = None,
        sinks: list[MetricsSink] | None = None,
        parent_run_id: str | None = None,
    ):
        self.cfg, self.run_dir, self.rank = cfg, Path(run_dir), rank
        self.device = device or resolve_device(cfg.train.device)
        categories = load_categories(cfg.data.prepared)
        self.names = {c["label"]: c["name"] for c in categories}
        self.student, self.teacher = build_student_teacher(cfg, len(categories), self.device)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.student)
        self.with_masks = cfg.model.arch == "mask_rcnn"
        self.stats = PseudoLabelStats()
        self.stats_at_last_eval = self.stats.state()  # pseudo-label figures are reported per evaluation interval
        self.scores = TeacherScores(cfg.ssl, self.names)
        self.step, self.skipped_steps, self.history, self.checkpoint_steps = 0, 0, [], []
        self.guard = SkipGuard(cfg.train.max_skipped_fraction, cfg.train.skip_window)
        self.stop_reason: str | None = None  # set when the run must end early with an error (metrics.json keeps it)
        self.diverged = False
        self.resumed_from_step: int | None = None
        self.sinks = sinks or []
        self.evaluator, self.tracker, self.last_pseudo = None, None, None
        if rank == 0:  # rank 0 alone evaluates and talks to MLflow
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
            self.evaluator = Evaluator.from_config(cfg)
            if cfg.tracking.enabled:
                from pipeline.tracking.tracker import Tracker  # MLflow is imported only by tracked runs

                self.tracker = Tracker(cfg, self.run_dir, run_name=self.run_dir.name, parent_run_id=parent_run_id)
                self.tracker.start()
                self.sinks.append(self.tracker)
        self._started, self._first_step = time.perf_counter(), 0

    def run(self, feed: "Feed") -> dict[str, Any]:
        """pseudo-label -> step -> teacher refresh -> publish -> evaluate -> checkpoint, until the last step
        or `train.target_ap`."""
        train = self.cfg.train
        while self.step < train.steps:
            mutual = self.in_mutual_learning()
            pseudo = feed.pseudo_batch(self) if mutual else None
            if feed.any_rank(mutual and pseudo is None):
                self.stop_reason = (
                    f"{Path(self.cfg.data.prepared) / UNLABELED_DIR}: the unlabeled stream ran dry at "
                    f"step {self.step} of {train.steps} (corrupt_rows_skipped in metrics.json)"
                )
                break
            self.train_step(feed.labeled_batch(), pseudo)
            if self.stop_reason is not None:
                break  # diverged: every rank skipped the same steps, so all stop here together
            feed.after_step(self)
            evaluate = self.should_evaluate()
            if evaluate and self.rank == 0:
                self.evaluate()
            if self.step % train.checkpoint_period == 0 and self.step < train.steps:
                self.checkpoint_steps.append(self.step)
                feed.checkpoint(self)
            if evaluate and feed.any_rank(self.rank == 0 and self.target_reached()):
                break
        return feed.finish(self)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return checkpoint_state(
            self.student,
            self.teacher,
            self.optimizer,
            self.scheduler,
            self.step,
            {
                "skipped_steps": self.skipped_steps,
                "stats": self.stats.state(),
                "stats_at_last_eval": json.dumps(self.stats_at_last_eval),
                "history": json.dumps(self.history),
                "checkpoint_steps": json.dumps(self.checkpoint_steps),
                "scores": self.scores.windows.state_dict(),
            },
        )

    def restore(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        for target, key in (
            (unwrap(self.student), "student"),
            (self.teacher, "teacher"),
            (self.optimizer, "optimizer"),
            (self.scheduler, "scheduler"),
        ):
            load_part(target, state, key, path)
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.stats = PseudoLabelStats.from_state(state["stats"])
        self.stats_at_last_eval = json.loads(state.get("stats_at_last_eval", json.dumps(state["stats"])))
        self.history = json.loads(state["history"])
        self.checkpoint_steps = json.loads(state.get("checkpoint_steps", "[]"))
        if state.get("scores"):
            self.scores.windows.load_state_dict(state["scores"])
        self._first_step = self.resumed_from_step = self.step

    # -- the algorithm -------------------------------------------------------------------------
    def in_mutual_learning(self) -> bool:
        """Whether the next step uses pseudo-labels."""
        return in_mutual_learning(self.step + 1, self.cfg.ssl.burn_in_steps)

    def pseudo_batch(
        self,
        weak: list[torch.Tensor],
        strong: list[torch.Tensor],
        kept: list[dict[str, torch.Tensor]],
        held_aside: list[dict[str, torch.Tensor] | None],
    ) -> Batch:
        """Both runners' pseudo-labeled batch: the teacher's kept boxes (with scores) on the weak views are counted
        against the held-aside labels and kept for the picture; the student gets the strong views."""
        for target, gt in zip(kept, held_aside):
            self.stats.add(target, gt)
        self.last_pseudo = (weak, kept)
        return Batch(strong, [without_scores(t) for t in kept])

    def train_step(self, labeled: Batch, pseudo_labeled: Batch | None) -> StepResult:
        ssl, train = self.cfg.ssl, self.cfg.train
        if pseudo_labeled is not None:
            pseudo_labeled = to_device(pseudo_labeled, self.device)
        result = unbiased_teacher_step(
            self.student,
            self.optimizer,
            to_device(labeled, self.device),
            pseudo_labeled,
            ssl.unsup_loss_weight,
            ssl.unsup_mask_loss,
            train.grad_clip_norm,
        )
        self.step += 1
        self.skipped_steps += int(result.skipped)
        self.guard.add(result.skipped)
        self._check_divergence()
        self.scheduler.step()
        refresh_teacher(
            self.teacher, self.student, self.step, ssl.burn_in_steps, ssl.teacher_update_interval, ssl.ema_keep_rate
        )
        self.scores.after_step(self.step)
        if self.step % train.log_period == 0 or result.skipped:
            self.log(
                {
                    **result.losses,
                    "total_loss": result.total,
                    "lr": self.scheduler.get_last_lr()[0],
                    "skipped_steps": self.skipped_steps,
                    **self._pseudo_label_scalars(),
                }
            )
        return result

    def _check_divergence(self, final: bool = False) -> None:
        reason = None if self.stop_reason else self.guard.verdict(self.step, self.cfg.train.lr, final)
        if reason:
            self.stop_reason, self.diverged = reason, True

    # -- bookkeeping ---------------------------------------------------------------------------
    def _pseudo_label_scalars(self) -> dict[str, float]:
        """Running pseudo-label statistics as plottable scalars (class shares beside the labeled prior)."""
        summary = self.stats.summary(self.names)
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        total = sum(summary["pseudo_label_class_counts"].values())
        if total:
            scalars.update(
                {f"pseudo_share/{name}": n / total for name, n in summary["pseudo_label_class_counts"].items()}
            )
        scalars.update(self.scores.scalars())
        scalars["train_steps_per_s"] = (self.step - self._first_step) / (time.perf_counter() - self._started)
        return scalars

    def log(self, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink(self.step, metrics)

    def should_evaluate(self) -> bool:
        return self.step % self.cfg.train.eval_period == 0 or self.step == self.cfg.train.steps

    def evaluate(self) -> dict[str, Any]:
        """Teacher and student AP (rank 0). Returns the entry appended to the history."""
        entry = {
            "step": self.step,
            "teacher": self.evaluator(self.teacher, self.device),
            "student": self.evaluator(self.student, self.device),
            "pseudo_labels": self.stats.since(self.stats_at_last_eval),
        }
        self.stats_at_last_eval = self.stats.state()
        self.history.append(entry)
        if self.tracker is not None and self.last_pseudo is not None:
            self.tracker.log_pseudo_label_grid(self.step, *self.last_pseudo, self.names)
        if self.tracker is not None:
            self.tracker.log_score_histograms(
                self.step,
                self.scores.per_class_windows(),
                self.scores.summary()["thresholds"],
            )
        flat = {
            f"{who}/{iou}/{k}": v
            for who in ("teacher", "student")
            for iou, d in entry[who].items()
            for k, v in d.items()
            if k != "per_class" and v is not None
        }
        flat.update({f"interval/{k}": v for k, v in entry["pseudo_labels"].items() if v is not None})
        self.log(flat)
        return entry

    def target_reached(self) -> bool:
        target = self.cfg.train.target_ap
        return bool(target and self.history and (self.history[-1]["teacher"]["bbox"]["AP"] or 0) >= target)

    def metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {"teacher": {}, "student": {}}
        return {
            "teacher": last["teacher"],
            "student": last["student"],
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "resumed_from_step": self.resumed_from_step,
            **self.stats.summary(self.names),
            **self.scores.summary(),
            "labeled_class_histogram": labeled_class_histogram(self.cfg.data.prepared, self.names),
            "history": [
                {
                    "step": h["step"],
                    "teacher_AP": h["teacher"]["bbox"]["AP"],
                    "student_AP": h["student"]["bbox"]["AP"],
                    **h.get("pseudo_labels", {}),
                }
                for h in self.history
            ],
            "checkpoint_steps": self.checkpoint_steps,  # the periodic ones; the last step always has one
            "seconds": (seconds := time.perf_counter() - self._started),
            "train_steps_per_s": (self.step - self._first_step) / seconds,
        }

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self._check_divergence(final=True)
        if not self.diverged and (not self.history or self.history[-1]["step"] != self.step):
            self.evaluate()  # (diverged weights would score nothing, or fail to)
        metrics = {**self.metrics(), **(extra or {}), "stop_reason": self.stop_reason}
        write_metrics(self.run_dir, metrics)
        if self.tracker is not None:
            self.tracker.finish(metrics, self.teacher)
        return metrics
