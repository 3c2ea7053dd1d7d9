"""`ssod label` of a prepared split on a real local Ray: precision/recall against the held-aside labels and a
threshold sweep, Mask R-CNN's RLE masks, and train -> label -> prepare -> train. Shared fixtures: conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import prepare_split, train_briefly
from labelrun import read_outputs, run_label
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

pytestmark = pytest.mark.slow  # a local Ray, training runs


def _label_split(capsys, checkpoint: Path, prepared: Path, out: Path, *args: str) -> tuple[int, str, str]:
    return run_label(capsys, "--checkpoint", str(checkpoint), "--prepared", str(prepared), "--out", str(out), *args)


def test_label_a_prepared_split_reports_precision_recall_and_a_sweep(
    ray_cluster, faster_run, label_prepared, tmp_path, capsys
):
    out = tmp_path / "split"
    code, printed, _ = _label_split(capsys, faster_run, label_prepared, out, "--split", "unlabeled", "--sweep")
    assert code == 0
    labels, report, _ = read_outputs(out)
    split = json.loads((label_prepared / "split.json").read_text())
    assert sorted(i["id"] for i in labels["images"]) == split["unlabeled"]
    held_aside = json.loads((label_prepared / "unlabeled_annotations.json").read_text())["annotations"]
    # the run's own threshold (tiny_config: ssl.score_threshold=0.05) is the default
    assert report["threshold"]["rule"] == "ssl.score_threshold"
    assert set(report["threshold"]["per_class"].values()) == {0.05}
    quality = report["quality"]
    assert quality["held_aside_boxes"] == len([a for a in held_aside if not a.get("iscrowd")])
    assert quality["kept_boxes"] == len(labels["annotations"]) and quality["images"] == split["num_unlabeled"]
    assert 0 <= quality["precision"] <= 1 and 0 <= quality["recall"] <= 1
    sweep = report["sweep"]
    assert [row["threshold"] for row in sweep] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    kept = [row["kept_boxes"] for row in sweep]
    assert kept == sorted(kept, reverse=True) and kept[0] <= quality["kept_boxes"]
    assert all(row["held_aside_boxes"] == quality["held_aside_boxes"] for row in sweep)
    assert "threshold precision recall" in printed and "0.90" in printed


@pytest.fixture(scope="module")
def mask_run(label_prepared: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mask") / "run"
    train_briefly(label_prepared, run_dir, "model.arch=mask_rcnn")
    return run_dir


def test_mask_rcnn_labels_carry_rle_masks(ray_cluster, mask_run, label_prepared, tmp_path, capsys):
    out = tmp_path / "masks"
    code, _, _ = _label_split(
        capsys, mask_run / "checkpoint.pt", label_prepared, out, "--split", "val", "--review", "2"
    )
    assert code == 0
    labels, report, _ = read_outputs(out)
    coco = COCO(str(out / "labels.json"))
    sizes = {i["id"]: (i["height"], i["width"]) for i in labels["images"]}
    assert labels["annotations"] and report["images_read"] == len(sizes)
    for ann in labels["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = coco.annToMask(ann)
        assert mask.shape == sizes[ann["image_id"]]
        assert ann["area"] == int(mask.sum())
        decoded = mask_utils.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded, mask)


def test_round_trip_train_label_prepare_train(
    ray_cluster, faster_run, label_prepared, label_coco, threshold, tmp_path, capsys
):
    out = tmp_path / "round"
    code, _, _ = _label_split(capsys, faster_run, label_prepared, out, "--threshold", str(threshold), "--review", "0")
    assert code == 0
    labels = json.loads((out / "labels.json").read_text())
    with_boxes = {a["image_id"] for a in labels["annotations"]}
    assert with_boxes, "the teacher kept no box: nothing to train on"
    second = tmp_path / "prepared2"
    report = prepare_split(label_coco, 50, second, annotations=out / "labels.json")
    val = json.loads((label_coco / "val" / "annotations.json").read_text())["annotations"]
    assert report["annotations_kept"] == len(labels["annotations"]) + len(val)  # every label box survives cleaning
    assert report["labeled"] == max(1, round(len(with_boxes) / 2))
    assert report["labeled"] + report["unlabeled"] == len(labels["images"])
    metrics = train_briefly(second, tmp_path / "run2", "ssl.burn_in_steps=1")
    assert metrics["steps"] == 2 and metrics["pseudo_labeled_images"] > 0
