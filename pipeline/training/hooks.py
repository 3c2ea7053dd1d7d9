"""The hooks of a training run (the loop calls them in list order; `standard_hooks` gives that order)."""

from __future__ import annotations

from typing import Any, Callable

from models.ranks import all_ranks_agree
from models.unbiased_teacher import refresh_teacher
from pipeline.evaluation.evaluator import Evaluator
from pipeline.training.checkpoints import save_checkpoint, write_metrics
from pipeline.training.divergence import DivergenceGuard
from pipeline.training.loop import Hook
from pipeline.training.state import RunState


def evaluation_due(run: RunState) -> bool:
    return run.step % run.cfg.train.eval_period == 0 or run.step == run.cfg.train.steps


class TeacherRefresh(Hook):
    """The teacher: a copy of the student when burn-in ends, then its EMA every `ssl.teacher_update_interval` steps."""

    def after_step(self, run: RunState) -> None:
        ssl = run.cfg.ssl
        refresh_teacher(
            run.teacher, run.student, run.step, ssl.burn_in_steps, ssl.teacher_update_interval, ssl.ema_keep_rate
        )


class ThresholdRefit(Hook):
    """`ssl.score_threshold: auto`: the per-class thresholds refitted every `ssl.threshold_refit_interval` steps."""

    def after_step(self, run: RunState) -> None:
        run.scores.after_step(run.step)


class Logging(Hook):
    """Losses, learning rate and the running pseudo-label scalars every `train.log_period` steps and after a
    skipped step; with `stream`, the feed's own scalars every `train.log_period` steps."""

    def __init__(self, stream: Callable[[], dict[str, float]] | None = None):
        self.stream = stream

    def after_step(self, run: RunState) -> None:
        period, result = run.cfg.train.log_period, run.last_result
        if run.step % period == 0 or result.skipped:
            run.log(
                {
                    **result.losses,
                    "total_loss": result.total,
                    "lr": run.scheduler.get_last_lr()[0],
                    "skipped_steps": run.skipped_steps,
                    **_pseudo_label_scalars(run),
                }
            )
        if self.stream is not None and run.step % period == 0 and (scalars := self.stream()):
            run.log(scalars)


def _pseudo_label_scalars(run: RunState) -> dict[str, float]:
    """Running pseudo-label statistics as plottable scalars (class shares beside the labeled prior)."""
    summary = run.stats.summary(run.names)
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    total = sum(summary["pseudo_label_class_counts"].values())
    if total:
        scalars.update({f"pseudo_share/{name}": n / total for name, n in summary["pseudo_label_class_counts"].items()})
    scalars.update(run.scores.scalars())
    scalars["train_steps_per_s"] = run.steps_per_s()
    return scalars


class Evaluation(Hook):
    """Teacher and student AP on the validation set (rank 0) every `train.eval_period` steps, at the last
    step, and at the end of a run that stopped between evaluations (unless it diverged)."""

    def __init__(self, run: RunState):
        self.evaluator = Evaluator.from_config(run.cfg) if run.rank == 0 else None

    def after_step(self, run: RunState) -> None:
        if run.rank == 0 and evaluation_due(run):
            self.evaluate(run)

    def after_run(self, run: RunState) -> None:
        if run.rank == 0 and not run.diverged and (not run.history or run.history[-1]["step"] != run.step):
            self.evaluate(run)  # (diverged weights would score nothing, or fail to)

    def evaluate(self, run: RunState) -> None:
        entry = {
            "step": run.step,
            "teacher": self.evaluator(run.teacher, run.device),
            "student": self.evaluator(run.student, run.device),
            "pseudo_labels": run.stats.since(run.stats_at_last_eval),
        }
        run.stats_at_last_eval = run.stats.state()
        run.history.append(entry)
        flat = {
            f"{who}/{iou}/{k}": v
            for who in ("teacher", "student")
            for iou, d in entry[who].items()
            for k, v in d.items()
            if k != "per_class" and v is not None
        }
        flat.update({f"interval/{k}": v for k, v in entry["pseudo_labels"].items() if v is not None})
        run.log(flat)


class TargetAP(Hook):
    """Stop once the teacher's bbox AP reaches `train.target_ap` (rank 0 evaluates; every rank stops)."""

    def after_step(self, run: RunState) -> None:
        target = run.cfg.train.target_ap
        if evaluation_due(run):  # every rank takes part in the agreement
            reached = bool(target and run.history and (run.history[-1]["teacher"]["bbox"]["AP"] or 0) >= target)
            run.target_reached = all_ranks_agree(run.rank == 0 and reached, run.device, any_rank=True)


class MetricsFile(Hook):
    """metrics.json at the end of the run (rank 0): the run's figures, the feed's `extra` ones, `stop_reason`."""

    def __init__(self, extra: Callable[[], dict[str, Any]]):
        self.extra = extra

    def after_run(self, run: RunState) -> None:
        extra = self.extra()  # every rank: on Ray it gathers from all of them
        if run.rank == 0:
            run.metrics = {**run.summary(), **extra, "stop_reason": run.stop_reason}
            write_metrics(run.run_dir, run.metrics)


class Tracking(Hook):
    """The MLflow run (rank 0, `tracking.enabled`): scalars as a log sink, the pseudo-label picture and
    score histograms at each evaluation, and at the end the summary and the registered teacher."""

    def __init__(self, run: RunState, parent_run_id: str | None = None):
        from pipeline.tracking.tracker import Tracker  # MLflow is imported only by tracked runs

        self.tracker = Tracker(run.cfg, run.run_dir, run_name=run.run_dir.name, parent_run_id=parent_run_id)
        self.tracker.start()
        run.sinks.append(self.tracker)
        self.pictured_step: int | None = None

    def before_run(self, run: RunState) -> None:
        self.pictured_step = run.history[-1]["step"] if run.history else None  # a resumed run's last evaluation

    def after_step(self, run: RunState) -> None:
        if run.history and run.history[-1]["step"] == run.step != self.pictured_step:
            self.pictured_step = run.step
            if run.last_pseudo is not None:
                self.tracker.log_pseudo_label_grid(run.step, *run.last_pseudo, run.names)
            self.tracker.log_score_histograms(
                run.step, run.scores.per_class_windows(), run.scores.summary()["thresholds"]
            )

    def after_run(self, run: RunState) -> None:
        self.after_step(run)  # the last evaluation's pictures
        self.tracker.finish(run.metrics, run.teacher)


class Checkpointing(Hook):
    """A checkpoint every `train.checkpoint_period` steps (every rank calls `save`), and beside metrics.json
    at the end of a run that did not fail (a failed one keeps its last periodic checkpoint)."""

    def after_step(self, run: RunState) -> None:
        if run.step % run.cfg.train.checkpoint_period == 0 and run.step < run.cfg.train.steps:
            run.checkpoint_steps.append(run.step)
            self.save(run)

    def save(self, run: RunState) -> None:
        save_checkpoint(run.state(), run.run_dir)

    def after_run(self, run: RunState) -> None:
        if run.rank == 0 and run.stop_reason is None:
            save_checkpoint(run.state(), run.run_dir)


def standard_hooks(
    run: RunState,
    checkpointing: Checkpointing,
    extra_metrics: Callable[[], dict[str, Any]],
    *,
    publisher: Hook | None = None,
    stream_scalars: Callable[[], dict[str, float]] | None = None,
    parent_run_id: str | None = None,
) -> list[Hook]:
    """Both runners' hooks in their order; `publisher` (Ray) sends the refreshed teacher to the labelers."""
    tracking = [Tracking(run, parent_run_id)] if run.rank == 0 and run.cfg.tracking.enabled else []
    return [
        TeacherRefresh(),
        ThresholdRefit(),
        Logging(stream_scalars),
        DivergenceGuard(run.cfg.train),
        *([publisher] if publisher is not None else []),
        Evaluation(run),
        MetricsFile(extra_metrics),
        *tracking,
        checkpointing,
        TargetAP(),
    ]
