"""Helpers of the `ssod label` tests: the command run in-process and its three output files read back."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main


def run_label(capsys, *args: str) -> tuple[int, str, str]:
    """`ssod label ARGS`: exit code, stdout, stderr."""
    code = main(["label", *args])
    out, err = capsys.readouterr()
    return code, out, err


def read_outputs(out: Path) -> tuple[dict, dict, dict]:
    """labels.json, label_report.json and review.json of a label run."""
    return tuple(json.loads((out / name).read_text()) for name in ("labels.json", "label_report.json", "review.json"))
