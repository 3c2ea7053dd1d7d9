"""Search spaces over the SSL parameters (and the learning rate), from the config's `tune.space`."""
from __future__ import annotations

from typing import Any

from ray import tune

from pipeline.config import SearchDim


def to_tune_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """Flat `section.key` names -> Ray Tune sampling domains."""
    domains = {}
    for key, dim in space.items():
        if dim.type == "choice":
            domains[key] = tune.choice(dim.values)
        elif dim.type == "uniform":
            domains[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            domains[key] = tune.loguniform(dim.low, dim.high)
        else:
            domains[key] = tune.randint(int(dim.low), int(dim.high))
    return domains
