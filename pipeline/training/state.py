"""What a training run holds and carries across a restart: models, optimizer, step, counters, history."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models.ema import unwrap
from models.unbiased_teacher import StepResult
from pipeline.config import Config, dump_config
from pipeline.data.readers import load_categories
from pipeline.training.checkpoints import checkpoint_state, load_checkpoint, load_part
from pipeline.training.pseudo_stats import PseudoLabelStats, labeled_class_histogram
from pipeline.training.setup import build_optimizer, build_student_teacher, resolve_device
from pipeline.training.teacher_scores import TeacherScores

MetricsSink = Callable[[int, dict[str, float]], None]


class RunState:
    """The run's shared state, which the loop and its hooks read and update.

    Args:
        cfg: the validated config.
        run_dir: `train.output_dir`; rank 0 writes config.yaml there (and later metrics.json).
        rank: this train worker's rank (0 in a local run).
        device: where the student trains (default: `train.device`).
        sinks: where `log` sends scalars (console, MLflow).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        rank: int = 0,
        device: torch.device | None = None,
        sinks: list[MetricsSink] | None = None,
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
        self.stop_reason: str | None = None  # the run must end early with an error (metrics.json keeps it)
        self.diverged = self.target_reached = False
        self.resumed_from_step: int | None = None
        self.sinks = list(sinks or [])
        self.last_result: StepResult | None = None
        self.last_pseudo: tuple[list, list] | None = None  # the last weak views and their kept boxes
        self.metrics: dict[str, Any] = {}  # metrics.json, once the run is over (rank 0)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.started, self.first_step = time.perf_counter(), 0

    @property
    def stopping(self) -> bool:
        """The run ends before its last step: it failed (`stop_reason`) or reached `train.target_ap`."""
        return self.stop_reason is not None or self.target_reached

    def wrap_student(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Put the student in a wrapper (DDP) that trains the same parameters."""
        self.student = wrap(self.student)

    def log(self, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink(self.step, metrics)

    def steps_per_s(self) -> float:
        return (self.step - self.first_step) / (time.perf_counter() - self.started)

    # -- checkpoint ------------------------------------------------------------------------------
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
        self.first_step = self.resumed_from_step = self.step

    # -- results ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """metrics.json's figures of the run itself (the last evaluation, counters, history, throughput)."""
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
            "seconds": (seconds := time.perf_counter() - self.started),
            "train_steps_per_s": (self.step - self.first_step) / seconds,
        }

    def latest_ap(self) -> dict[str, float]:
        """The last evaluation's bbox AP of teacher and student (0 before the first)."""
        if not self.history:
            return {"teacher_AP": 0.0, "student_AP": 0.0}
        last = self.history[-1]
        return {"teacher_AP": last["teacher"]["bbox"]["AP"], "student_AP": last["student"]["bbox"]["AP"]}
