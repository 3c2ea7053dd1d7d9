"""Search spaces over the SSL parameters (and the learning rate), from the config's `tune.space`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import tune

from pipeline.config import Config
from pipeline.config_sections import SearchDim
from pipeline.errors import InputError


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


def check_space(cfg: Config) -> None:
    """Every value a trial can draw must make a valid config: refuse up front, not trial by trial."""
    for key, dim in cfg.tune.space.items():
        bounds = (int(dim.low), int(dim.high) - 1) if dim.type == "randint" else (dim.low, dim.high)  # high exclusive
        for value in dim.values if dim.type == "choice" else bounds:
            try:
                cfg.with_overrides({key: value})
            except ValidationError as err:
                reason = err.errors()[0]["msg"]
                raise InputError(f"tune.space.{key}: the value {value!r} makes an invalid config: {reason}") from None
