"""The one public "train with this config" entry (used by the CLI and by Ray Tune) and checkpoint scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.weights_report import LOADS, PartialWeightsError, load_checked, load_summary
from pipeline.config import Config
from pipeline.data.readers import load_categories
from pipeline.errors import InputError
from pipeline.evaluation.evaluator import Evaluator
from pipeline.preflight import check_model
from pipeline.training.checkpoints import CHECKPOINT_NAME, load_checkpoint, write_metrics
from pipeline.training.setup import build_student_teacher, resolve_device


def train(cfg: Config) -> Path:
    """Run burn-in + mutual learning with the configured backend; returns the run directory."""
    LOADS.clear()
    if cfg.train.backend == "local":
        from pipeline.training.local import train_local

        resume = Path(cfg.train.output_dir) / CHECKPOINT_NAME
        if resume.is_file():  # what the resume loads, counted and checked as on Ray (preflight.check_model)
            check_model(cfg, len(load_categories(cfg.data.prepared)), resume)
        metrics = train_local(cfg)
    else:
        from pipeline.distributed.driver import train_ray

        metrics = train_ray(cfg)
    _record_loads(cfg, metrics)
    _print_summary(metrics)
    if metrics.get("stop_reason"):  # metrics.json is written and names the reason too
        raise InputError(metrics["stop_reason"])
    return Path(cfg.train.output_dir).resolve()


def _record_loads(cfg: Config, metrics: dict[str, Any]) -> None:
    """metrics.json's `weights_load`: what each weights load of the run matched (models.weights_report)."""
    loads = load_summary()
    if not loads:
        return
    metrics["weights_load"] = loads
    path = Path(cfg.train.output_dir) / "metrics.json"
    if path.is_file():
        on_disk = json.loads(path.read_text())
        on_disk["weights_load"] = loads
        write_metrics(cfg.train.output_dir, on_disk)


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
    try:
        report = load_checked(model, state[which], f"{checkpoint} ({which})", which, cfg.model.allow_partial_weights)
    except PartialWeightsError as exc:
        raise InputError(str(exc)) from None
    return {**Evaluator.from_config(cfg)(model, device), "weights_load": [report.as_dict()]}
