"""A run's device, its student and teacher detectors, and the student's optimizer."""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.builders import WeightsFileError, build_detector
from models.pretrained import PretrainedWeightsError
from pipeline.config import Config
from pipeline.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device={name}: CUDA is not available on this machine")
    if name == "cpu":
        torch.set_flush_denormal(True)  # denormal floats make a CPU step 10-30x slower
    return torch.device(name)


def build_student_teacher(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The student (seeded with `train.seed`) and its frozen copy, the teacher, in eval mode."""
    torch.manual_seed(cfg.train.seed)
    try:
        student = build_detector(num_classes, **cfg.model.model_dump()).to(device)
    except WeightsFileError as exc:
        raise InputError(f"model.weights_path: {exc}") from None
    except PretrainedWeightsError as exc:
        raise InputError(str(exc)) from None
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return student, teacher


def build_optimizer(
    cfg: Config, student: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with linear warm-up, as Detectron2 and torchvision's detection references do."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    warmup = max(cfg.train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    return optimizer, scheduler
