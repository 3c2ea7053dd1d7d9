"""Search spaces over the SSL parameters (and the learning rate), from the config's `tune.space`.

A dimension is typed by the key it searches: an integer key takes `randint` or `choice` (a `uniform` draw of
1234.5 for `ssl.burn_in_steps` is no step count), and every value a dimension can draw must make a valid
config, checked over its whole range before the search starts, not trial by trial.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import ValidationError
from ray import tune

from pipeline.config import Config
from pipeline.config_sections import SearchDim
from pipeline.errors import InputError

PROBES = 9  # values checked inside a range, besides its ends


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


def key_types(key: str) -> set[type]:
    """The Python types a config key takes (`ssl.score_threshold`: float and str)."""
    section, _, name = key.partition(".")
    annotation = Config.model_fields[section].annotation.model_fields[name].annotation
    found: set[type] = set()
    todo = [annotation]
    while todo:
        t = todo.pop()
        origin = typing.get_origin(t)
        if isinstance(t, types.UnionType) or origin is typing.Union or origin is typing.Annotated:
            todo += typing.get_args(t) if origin is not typing.Annotated else [typing.get_args(t)[0]]
        elif origin is typing.Literal:
            found |= {type(v) for v in typing.get_args(t)}
        else:
            found.add(origin or t)
    return found


def _range_error(key: str, dim: SearchDim) -> str | None:
    """Why a range dimension cannot search `key` at all, else None."""
    numbers = key_types(key) & {int, float}
    if not numbers:
        return f"a {dim.type} dimension draws numbers; this key takes {_names(key_types(key))}: use choice"
    if dim.type in ("uniform", "loguniform") and float not in numbers:
        return f"an integer key: {dim.type} draws fractions (e.g. {_between(dim):g}); use randint or choice"
    if dim.type == "loguniform" and dim.low <= 0:
        return f"loguniform needs low > 0 (got {dim.low:g})"
    if dim.type == "randint":
        if not (float(dim.low).is_integer() and float(dim.high).is_integer()):
            return f"randint needs whole-number bounds (got {dim.low:g}, {dim.high:g})"
    return None


def _names(found: set[type]) -> str:
    return " or ".join(sorted(t.__name__ for t in found))


def _between(dim: SearchDim) -> float:
    return dim.low + (dim.high - dim.low) * 0.37


def probe_values(dim: SearchDim) -> list[Any]:
    """The values checked for a dimension: every choice; a range's ends and points spread over it."""
    if dim.type == "choice":
        return list(dim.values)
    if dim.type == "randint":  # high is exclusive
        low, last = int(dim.low), int(dim.high) - 1
        step = max(1, (last - low) // (PROBES + 1))
        return sorted({low, last, *range(low, last + 1, step)})
    if dim.type == "loguniform":
        lo, hi = math.log(dim.low), math.log(dim.high)
        inside = [math.exp(lo + (hi - lo) * i / (PROBES + 1)) for i in range(1, PROBES + 1)]
    else:
        inside = [dim.low + (dim.high - dim.low) * i / (PROBES + 1) for i in range(1, PROBES + 1)]
    return [float(dim.low), *inside, math.nextafter(dim.high, dim.low)]  # high is exclusive


def check_space(cfg: Config) -> None:
    """Every value a trial can draw must make a valid config: refuse up front, not trial by trial."""
    for key, dim in cfg.tune.space.items():
        if dim.type != "choice":
            reason = _range_error(key, dim)
            if reason:
                raise InputError(f"tune.space.{key}: {reason}")
        for value in probe_values(dim):
            try:
                cfg.with_overrides({key: value})
            except ValidationError as err:
                reason = err.errors()[0]["msg"].removeprefix("Value error, ")
                raise InputError(f"tune.space.{key}: the value {value!r} makes an invalid config: {reason}") from None
