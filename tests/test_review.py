"""The review ranking rule and the streaming COCO writer, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.distributed.labeler import encode_masks
from pipeline.labeling.coco_writer import CocoWriter, annotations
from pipeline.labeling.review import ReviewQueue, Uncertainty, uncertainty, write_grids

THRESHOLDS = np.array([0.5, 0.7, 0.5], dtype=np.float32)  # per model label; 0 is background


def test_uncertainty_is_the_share_of_candidates_in_the_middle_band():
    labels = np.array([1, 1, 1, 2, 2])
    scores = np.array([0.95, 0.75, 0.45, 0.55, 0.2])
    # class 1 (t 0.7): band [0.5, 0.8) holds 0.75; 0.45 is no candidate. class 2 (t 0.5): band [0.3, 0.6) holds 0.55
    u = uncertainty(labels, scores, THRESHOLDS)
    assert (u.share, u.candidates) == (pytest.approx(2 / 3), 3)
    assert u.mean_score == pytest.approx((0.95 + 0.75 + 0.55) / 3)
    assert uncertainty(np.array([1]), np.array([0.3]), THRESHOLDS).candidates == 0


def test_queue_ranks_by_share_then_low_mean_and_draws_only_the_top():
    queue, drawn = ReviewQueue(pictured=2, listed=3), []
    cases = {1: (0.2, 0.9), 2: (0.8, 0.6), 3: (0.8, 0.5), 4: (0.0, 1.0), 5: (0.5, 0.7)}
    for image_id, (share, mean) in cases.items():
        queue.offer(
            image_id,
            Uncertainty(share, mean, 4),
            {"file_name": f"{image_id}.png"},
            lambda i=image_id: drawn.append(i) or i,
        )
    assert [r["image_id"] for r in queue.ranked()] == [3, 2, 5]  # equal shares: the lower mean score first
    assert [r["rank"] for r in queue.ranked()] == [1, 2, 3]
    assert [picture for _, picture in queue.pictures()] == [3, 2]
    assert 4 not in drawn and queue.seen == 5  # an image that never entered the top was never drawn


def test_grids_hold_the_pictures_in_review_order(tmp_path):
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    target = {
        "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.7]),
    }
    paths = write_grids([({}, (image, target))] * 9, {1: "cat"}, tmp_path / "review")
    assert [p.name for p in paths] == ["grid_00.png", "grid_01.png"]  # 8 per grid
    assert Image.open(paths[0]).size == (4 * 60 + 5 * 2, 2 * 40 + 3 * 2)


def test_coco_writer_streams_a_loadable_file(tmp_path):
    masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
    masks[0, 2:10, 3:12], masks[1, 5:15, 10:30] = 1, 1
    writer = CocoWriter(tmp_path / "labels.json", [{"id": 7, "name": "cat"}], {"description": "test"})
    boxes = np.array([[3, 2, 12, 10], [10, 5, 30, 15]], dtype=np.float32)
    anns = annotations(boxes, np.array([1, 1]), np.array([0.9, 0.6]), encode_masks(masks), {1: 7})
    writer.add({"id": 4, "file_name": "a.png", "width": 30, "height": 20}, anns)
    writer.add({"id": 5, "file_name": "b.png", "width": 30, "height": 20}, [])
    assert writer.close() == {"images": 2, "annotations": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]  # the line files are gone
    coco = COCO(str(tmp_path / "labels.json"))
    assert sorted(coco.getImgIds()) == [4, 5] and coco.getCatIds() == [7]
    first, second = (coco.anns[i] for i in (1, 2))
    assert first["bbox"] == [3.0, 2.0, 9.0, 8.0] and first["area"] == 8 * 9 and first["score"] == 0.9
    assert np.array_equal(coco.annToMask(second), masks[1].numpy())
    assert second["area"] == float(
        mask_utils.area({**second["segmentation"], "counts": second["segmentation"]["counts"].encode()})
    )
    assert json.loads((tmp_path / "labels.json").read_text())["info"] == {"description": "test"}
