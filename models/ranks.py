"""Decisions and values shared by the DDP ranks of a run (torch.distributed; one process: the value itself).

Ranks that decided apart would wait for each other in the next collective forever, so every decision that
changes what a rank does next (skip a step, stop the run) goes through `all_ranks_agree`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_ranks_agree(flag: bool, device: torch.device, any_rank: bool = False) -> bool:
    """One decision for every rank: all of them (or, with `any_rank`, any of them) said yes."""
    if not distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if any_rank else dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order, on every rank."""
    if not distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
