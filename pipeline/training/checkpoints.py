"""A run's files: the checkpoint (written atomically, read with a one-line error) and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.ema import unwrap
from models.torch_files import read_tensor_file
from pipeline.errors import InputError
from pipeline.paths import output_errors

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_state(
    student: nn.Module, teacher: nn.Module, optimizer, scheduler, step: int, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        **extra,
    }


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / CHECKPOINT_NAME
    with output_errors(path, "the checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of `ssod train` (student, teacher, optimizer, scheduler, step, ...)."""
    state = read_tensor_file(path, InputError, "checkpoint", "not a readable checkpoint: ")
    if not isinstance(state, dict) or not {"student", "teacher", "step"} <= state.keys():
        raise InputError(f"{path}: not a checkpoint of `ssod train` (needs student, teacher and step)")
    return state


def load_part(target: Any, state: dict[str, Any], key: str, path: str | Path) -> None:
    """`target.load_state_dict(state[key])` (a model, optimizer or scheduler), a mismatch named in one line."""
    try:
        target.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:160]
        raise InputError(
            f"{path}: its {key} does not fit this config (another model.arch, model.backbone or "
            f"set of classes?): {detail}"
        ) from None


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(run_dir) / "metrics.json"
    with output_errors(path, "metrics"):
        path.write_text(json.dumps(metrics, indent=2))
    return path
