"""Per-class adaptive thresholds (`ssl.score_threshold: auto`): the fit, the floor, checkpoints, the local run."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from models.pseudo_labels import filter_detections
from models.thresholds import AdaptiveThresholds, two_gaussian_split
from pipeline.training.local import train_local


def _two_modes(low: float, high: float, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([low + 0.05 * torch.randn(n, generator=g), high + 0.03 * torch.randn(n // 4, generator=g)]).clamp(
        0.01, 1
    )


def test_two_clear_modes_per_class_give_a_threshold_between_them():
    thresholds = AdaptiveThresholds(3, floor=0.2, ceiling=0.95, window=1000)
    for label, (low, high) in {1: (0.2, 0.85), 2: (0.35, 0.6)}.items():
        scores = _two_modes(low, high, seed=label)
        thresholds.observe(torch.full_like(scores, label, dtype=torch.int64), scores)
    values = thresholds.refit()
    assert 0.3 < values[1] < 0.8 and 0.45 < values[2] < 0.58
    assert values[3] == pytest.approx(0.2)  # no scores: the floor


def test_thresholds_stay_within_floor_and_ceiling():
    thresholds = AdaptiveThresholds(1, floor=0.5, ceiling=0.9, window=1000)
    scores = _two_modes(0.1, 0.3)
    thresholds.observe(torch.ones_like(scores, dtype=torch.int64), scores)
    assert thresholds.refit()[1] == pytest.approx(0.5)
    assert two_gaussian_split(torch.full((50,), 0.4)) is None


def test_per_class_thresholds_filter_by_label():
    output = {"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.6, 0.6, 0.9])}
    kept = filter_detections(output, torch.tensor([1.0, 0.5, 0.8]))
    assert kept["labels"].tolist() == [1, 2] and kept["scores"].tolist() == pytest.approx([0.6, 0.9])


@pytest.mark.slow  # trains end to end
def test_thresholds_survive_a_checkpoint_round_trip(prepared, tmp_path):
    cfg = tiny_config(
        prepared,
        tmp_path / "auto",
        "train.backend=local",
        "ssl.score_threshold=auto",
        "ssl.threshold_refit_interval=2",
        "ssl.threshold_floor=0.05",
        "train.steps=6",
    )
    first = train_local(cfg)
    written = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert set(written["thresholds"]) == set(written["labeled_class_histogram"])
    assert all(0.05 <= t <= 0.9 for t in written["thresholds"].values())
    assert set(written["score_quantiles"]) == set(written["thresholds"])
    resumed = train_local(cfg.with_overrides({"train.steps": 6}))  # nothing left to train: restored as saved
    assert resumed["thresholds"] == first["thresholds"] and resumed["score_quantiles"] == first["score_quantiles"]


@pytest.mark.slow
def test_published_thresholds_reach_the_labeler_with_the_weights(ray_cluster, prepared, tmp_path):
    from pipeline.data.readers import load_categories
    from pipeline.data.rows import read_rows
    from pipeline.data.schema import UNLABELED_DIR
    from pipeline.distributed.labeler import TeacherLabeler
    from pipeline.distributed.weights import get_or_create_store, publish
    from pipeline.training.setup import build_student_teacher

    cfg = tiny_config(prepared, tmp_path, "ssl.score_threshold=auto", "model.min_size=[96]")
    num_classes = len(load_categories(prepared))
    _, teacher = build_student_teacher(cfg, num_classes, torch.device("cpu"))
    store = get_or_create_store("test-thresholds-store")
    thresholds = [1.0] + [0.05] * (num_classes - 1) + [1.0]  # the last class is shut out
    ray_cluster.get(publish(store, 3, teacher, thresholds))
    labeler = TeacherLabeler(cfg.model_dump(), num_classes, "test-thresholds-store")
    rows = read_rows(prepared / UNLABELED_DIR)[:2]
    out = labeler({key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})  # as Ray Data
    assert labeler.threshold.tolist() == pytest.approx(thresholds) and out["teacher_version"].tolist() == [3, 3]
    assert sum(len(labels) for labels in out["teacher_labels"]) > 0, "the teacher detected nothing to threshold"
    for labels, scores, kept in zip(out["teacher_labels"], out["teacher_scores"], out["pl_labels"]):
        expected = [int(lab) for lab, s in zip(labels, scores) if lab != num_classes and s >= 0.05]
        assert sorted(kept.tolist()) == sorted(expected)
