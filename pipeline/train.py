"""The one public "train with this config" entry (used by the CLI and by Ray Tune) and checkpoint scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.readers import load_categories
from pipeline.errors import InputError
from pipeline.evaluation.evaluator import Evaluator
from pipeline.training.session import build_student_teacher, load_checkpoint, load_part, resolve_device


def train(cfg: Config) -> Path:
    """Run burn-in + mutual learning with the configured backend; returns the run directory."""
    if cfg.train.backend == "local":
        from pipeline.training.local import train_local

        metrics = train_local(cfg)
    else:
        from pipeline.distributed.driver import train_ray

        metrics = train_ray(cfg)
    _print_summary(metrics)
    if metrics.get("stop_reason"):  # metrics.json is written and names the reason too
        raise InputError(metrics["stop_reason"])
    return Path(cfg.train.output_dir).resolve()


def _print_summary(metrics: dict[str, Any]) -> None:
    for who in ("teacher", "student"):
        for iou, scores in metrics.get(who, {}).items():
            print(f"{who:8s} {iou:5s} AP {scores['AP']:.2f}  AP50 {scores['AP50']:.2f}  AP75 {scores['AP75']:.2f}")


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, which: str = "teacher") -> dict[str, Any]:
    """Score the saved teacher (or student) of a checkpoint on the validation set."""
    state = load_checkpoint(checkpoint)
    device = resolve_device(cfg.train.device)
    categories = load_categories(cfg.data.prepared)
    model, _ = build_student_teacher(cfg, len(categories), device)
    load_part(model, state, which, checkpoint)
    return Evaluator.from_config(cfg)(model, device)
