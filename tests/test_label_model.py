"""Which threshold `ssod label` applies, and where a checkpoint's run is found; no Ray."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.labeling.model import LabelModel, from_checkpoint, label_thresholds

CATEGORIES = [{"id": 3, "name": "cat", "label": 1}, {"id": 9, "name": "dog", "label": 2}]


def _model(*overrides: str, fitted: list[float] | None = None) -> LabelModel:
    return LabelModel(load_config(None, list(overrides)), CATEGORIES, {}, fitted, "test")


def test_threshold_rules():
    assert label_thresholds(_model("ssl.score_threshold=0.7"), 0.35) == ([0.35] * 3, "--threshold")
    assert label_thresholds(_model("ssl.score_threshold=0.7"), None) == ([0.7] * 3, "ssl.score_threshold")
    fitted = [0.5, 0.62, 0.81]
    values, rule = label_thresholds(_model("ssl.score_threshold=auto", fitted=fitted), None)
    assert values == fitted and "fitted" in rule
    values, rule = label_thresholds(_model("ssl.score_threshold=auto", "ssl.threshold_floor=0.4"), None)
    assert values == [0.4] * 3 and "threshold_floor" in rule
    # a fit for another number of classes is not applied
    assert label_thresholds(_model("ssl.score_threshold=auto", fitted=[0.6] * 5), None)[0] == [0.5] * 3


def test_a_run_directory_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(InputError, match="no checkpoint.pt in this run directory"):
        from_checkpoint(tmp_path, None, [], "teacher")
