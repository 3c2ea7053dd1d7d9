"""The console metrics sink of both runners."""

from __future__ import annotations

import json

CONSOLE_DETAIL = ("pseudo_share/", "/AP75", "/APs", "/APm", "/APl")  # per-class shares and per-size APs


def print_sink(step: int, metrics: dict[str, float]) -> None:
    """One JSON line per log: losses, AP/AP50 and pseudo-label scalars, without per-class and per-size detail."""
    shown = {
        k: round(v, 4)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not any(part in k for part in CONSOLE_DETAIL)
    }
    print(json.dumps({"step": step, **shown}), flush=True)
