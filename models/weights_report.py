"""What a weights load took: tensors matched, missing, unexpected and shape-mismatched, and when to refuse.

Every load of weights into a model (`model.weights_path`, a resumed checkpoint, `ssod evaluate`, `ssod label`)
compares the file with the model here. A load that fills less than `MIN_MATCHED_FRACTION` of the model's
tensors, or any tensor of the wrong shape, is refused with these numbers, unless the caller accepts a partial
load on purpose (`model.allow_partial_weights: true`). The reports of the process are kept in `LOADS`, for
`metrics.json` (`weights_load`).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from torch import Tensor

MIN_MATCHED_FRACTION = 0.5
LOADS: list[dict] = []  # this process's load reports, newest last


class PartialWeightsError(ValueError):
    """A load that matches too little of the model; the message is one line with the counts."""


@dataclass(frozen=True)
class LoadReport:
    source: str  # the file, and the part of it loaded ("... (teacher)")
    target: str  # what received it: "detector", "backbone", "student", ...
    model_tensors: int
    matched: int
    missing: int
    unexpected: int
    shape_mismatched: int
    first_missing: str | None = None
    first_mismatch: str | None = None  # "key: file (1, 2), model (3, 2)"

    @property
    def fraction(self) -> float:
        return self.matched / self.model_tensors if self.model_tensors else 0.0

    def counts(self) -> str:
        return (
            f"{self.matched} of {self.model_tensors} {self.target} tensors matched "
            f"({self.missing} missing, {self.unexpected} unexpected, {self.shape_mismatched} shape-mismatched)"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": round(self.fraction, 4)}


def _counted(key: str) -> bool:
    return not key.endswith("num_batches_tracked")  # BatchNorm's step counter: no weight, often absent


def compare(own: dict[str, Tensor], state: dict[str, Tensor], source: str, target: str) -> LoadReport:
    """The file's tensors (`state`) against the model's (`own`), by name and shape."""
    own_keys = [k for k in own if _counted(k)]
    mismatched = [k for k in own_keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own_keys if k not in state]
    unexpected = [k for k in state if k not in own and _counted(k)]
    first = mismatched[0] if mismatched else None
    return LoadReport(
        source=source,
        target=target,
        model_tensors=len(own_keys),
        matched=len(own_keys) - len(missing) - len(mismatched),
        missing=len(missing),
        unexpected=len(unexpected),
        shape_mismatched=len(mismatched),
        first_missing=missing[0] if missing else None,
        first_mismatch=None
        if first is None
        else f"{first}: file {tuple(state[first].shape)}, model {tuple(own[first].shape)}",
    )


def check(report: LoadReport, allow_partial: bool, flag: str = "model.allow_partial_weights=true") -> LoadReport:
    """Refuse a load that matches too little (or any tensor of another shape), unless `allow_partial`;
    log the counts and keep the report in `LOADS` either way."""
    if not report.matched or (
        not allow_partial and (report.fraction < MIN_MATCHED_FRACTION or report.shape_mismatched)
    ):
        why = (
            f"shape mismatch at {report.first_mismatch}"
            if report.shape_mismatched
            else f"first missing: {report.first_missing}"
        )
        accept = "" if not report.matched or not flag else f"; set {flag} to load it anyway"
        raise PartialWeightsError(
            f"{report.source}: {report.counts()}; {why} (different model.arch/backbone or number of classes?){accept}"
        )
    print(f"weights {report.source}: {report.counts()}", file=sys.stderr)
    LOADS.append(report.as_dict())
    return report


def load_summary() -> list[dict]:
    """The reports of this process's loads (for metrics.json's `weights_load`), each load once."""
    return list({(r["source"], r["target"]): r for r in LOADS}.values())


def load_checked(model, state: dict[str, Tensor], source: str, target: str, allow_partial: bool = False) -> LoadReport:
    """`model.load_state_dict(state)` after `check`: whole when everything matched, else the matching part."""
    own = model.state_dict()
    report = check(compare(own, state, source, target), allow_partial)
    if report.matched == report.model_tensors and not report.unexpected:
        model.load_state_dict(state)
    else:
        model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return report
