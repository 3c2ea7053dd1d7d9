"""The Unbiased Teacher training step and teacher schedule (Liu et al., ICLR 2021).

burn-in:          loss = L_sup(labeled)
mutual learning:  loss = L_sup(labeled) + lambda_u * L_unsup(strong view, teacher's pseudo-labels)
teacher:          copied from the student when burn-in ends, then EMA-refreshed every N steps
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.ema import ema_update
from models.losses import unsupervised_loss
from models.ranks import all_ranks_agree

Targets = list[dict[str, Tensor]]


@dataclass
class Batch:
    """What the student trains on: float images in [0, 1] and their detector targets, index by index."""

    images: list[Tensor]
    targets: Targets


@dataclass
class StepResult:
    losses: dict[str, float] = field(default_factory=dict)
    total: float = float("nan")
    skipped: bool = False


def _all_ranks_finite(value: Tensor) -> bool:
    """A skipped step must be skipped on every DDP rank."""
    return all_ranks_agree(bool(torch.isfinite(value.detach()).all()), value.device)


def unbiased_teacher_step(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    labeled: Batch,
    pseudo_labeled: Batch | None,
    unsup_loss_weight: float,
    unsup_mask_loss: bool = True,
    grad_clip_norm: float | None = None,
) -> StepResult:
    """One student update: the supervised loss, plus the weighted unsupervised loss in mutual learning.

    With `unsup_loss_weight` 0 (the supervised baseline) the pseudo-labeled batch is not trained on at all.
    A non-finite loss or gradient skips the update: it is reported, and never reaches the weights (the
    decision is the same on every DDP rank).

    Args:
        student: the detector being trained (bare or DDP-wrapped); left in train mode.
        optimizer: the student's optimizer; stepped unless the update is skipped.
        labeled: labeled images in both views with their targets.
        pseudo_labeled: strong views with the teacher's kept boxes as targets; None in burn-in.
        unsup_loss_weight: lambda_u, the weight of the pseudo-label loss.
        unsup_mask_loss: whether the pseudo-label loss includes Mask R-CNN's mask term.
        grad_clip_norm: clip the gradient to this total norm (None: no clipping).

    Returns:
        The step's loss terms (floats), the total loss, and whether the update was skipped.
    """
    student.train()
    sup = student(labeled.images, labeled.targets)
    total = sum(sup.values())
    logged = {f"sup/{k}": v for k, v in sup.items()}
    if pseudo_labeled is not None and unsup_loss_weight > 0:
        unsup_terms = student(pseudo_labeled.images, pseudo_labeled.targets)
        unsup = unsupervised_loss(unsup_terms, use_mask=unsup_mask_loss)
        total = total + unsup_loss_weight * unsup
        logged.update({f"unsup/{k}": v for k, v in unsup_terms.items()}, **{"unsup/total": unsup})
    losses = {k: float(v.detach()) for k, v in logged.items()}

    optimizer.zero_grad(set_to_none=True)
    if not _all_ranks_finite(total):
        return StepResult(losses, float(total.detach()), skipped=True)
    total.backward()
    if grad_clip_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip_norm)
        if not _all_ranks_finite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(losses, float(total.detach()), skipped=True)
    optimizer.step()
    return StepResult(losses, float(total.detach()))


def refresh_teacher(
    teacher: nn.Module, student: nn.Module, step: int, burn_in_steps: int, update_interval: int, keep_rate: float
) -> bool:
    """Call after student step `step` (1-based). Returns True when the teacher changed."""
    if step < burn_in_steps:
        return False
    if step == burn_in_steps:
        ema_update(teacher, student, keep_rate=0.0)  # the teacher starts as an exact copy
        return True
    if (step - burn_in_steps) % update_interval == 0:
        ema_update(teacher, student, keep_rate=keep_rate)
        return True
    return False


def without_scores(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """A pseudo-label as a training target: the teacher's scores are not part of it."""
    return {k: v for k, v in target.items() if k != "scores"}


def in_mutual_learning(step: int, burn_in_steps: int) -> bool:
    """Whether 1-based student step `step` uses pseudo-labels (the teacher exists from burn-in's end)."""
    return step > burn_in_steps
