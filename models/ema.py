"""The teacher is an exponential moving average of the student over the whole state dict."""

from __future__ import annotations

import torch
from torch import nn


def keep_rate_from_span(span: int) -> float:
    """The product's "average over the N most recent iterations": k = 1 - 2 / (N + 1)."""
    if span < 1:
        raise ValueError(f"EMA span must be >= 1, got {span}")
    return 1.0 - 2.0 / (span + 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`), so state-dict keys match between student and teacher."""
    return getattr(model, "module", model)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float) -> None:
    """teacher = k * teacher + (1 - k) * student, over parameters and buffers; k = 0 copies exactly.

    Integer buffers (BatchNorm's `num_batches_tracked`) cannot be averaged and are copied.
    """
    if not 0.0 <= keep_rate < 1.0 + 1e-12:
        raise ValueError(f"EMA keep rate must be in [0, 1], got {keep_rate}")
    student_state = unwrap(student).state_dict()
    for name, t in unwrap(teacher).state_dict().items():
        s = student_state[name].to(t.device)
        if keep_rate == 0.0 or not t.is_floating_point():
            t.copy_(s)
        else:
            t.mul_(keep_rate).add_(s, alpha=1.0 - keep_rate)
