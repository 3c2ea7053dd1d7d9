"""Hand-computable COCO scoring cases for pipeline.evaluation.scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.evaluation.scoring import score_coco, to_coco_results

# COCO AP averages precision at 101 recall points 0.00, 0.01, ..., 1.00.
# When recall tops out at 0.5, only the 51 points 0.00..0.50 can have non-zero
# precision; the other 50 count as 0.
POINTS_UP_TO_HALF = 51 / 101


def _gt(boxes: list[tuple[int, int, list[float]]], cats=(("a", 1),), n_images: int = 2) -> dict:
    """boxes: (image_id, category_id, [x, y, w, h]); 100x100 images."""
    return {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(1, n_images + 1)],
        "annotations": [
            {"id": j, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for j, (img, cat, box) in enumerate(boxes, start=1)
        ],
        "categories": [{"id": cid, "name": name} for name, cid in cats],
    }


def _det(image_id: int, category_id: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


BOX1 = [10.0, 10.0, 40.0, 40.0]  # area 1600: "medium" (32^2 < area < 96^2)
BOX2 = [50.0, 50.0, 40.0, 40.0]
MISS = [0.0, 0.0, 5.0, 5.0]  # IoU 0 with BOX2


def test_perfect_detections_score_100():
    gt = _gt([(1, 1, BOX1), (2, 1, BOX2)])
    res = score_coco(gt, [_det(1, 1, BOX1, 1.0), _det(2, 1, BOX2, 1.0)])["bbox"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(100.0)
    assert res["APm"] == pytest.approx(100.0)
    # No small or large GT boxes: pycocotools' -1 ("undefined") becomes None.
    assert res["APs"] is None and res["APl"] is None
    assert res["per_class"] == {"a": pytest.approx(100.0)}


def test_empty_detections_score_zero():
    gt = _gt([(1, 1, BOX1), (2, 1, BOX2)])
    res = score_coco(gt, [])["bbox"]
    assert res["AP"] == 0.0
    assert res["AP50"] == 0.0
    assert res["per_class"] == {"a": 0.0}


def test_half_right_correct_detection_ranked_first():
    # Ranked by score: TP (0.9) then FP (0.8); 2 GT boxes.
    # recall = [0.5, 0.5], precision = [1.0, 0.5] -> interpolated precision is
    # 1.0 at every recall point <= 0.5 (51 of 101 points) and 0 above.
    # AP = 100 * 51/101 ~= 50.495, the same at every IoU threshold (IoUs are 1 or 0).
    gt = _gt([(1, 1, BOX1), (2, 1, BOX2)])
    res = score_coco(gt, [_det(1, 1, BOX1, 0.9), _det(2, 1, MISS, 0.8)])["bbox"]
    assert res["AP"] == pytest.approx(100 * POINTS_UP_TO_HALF)
    assert res["AP50"] == pytest.approx(100 * POINTS_UP_TO_HALF)
    assert res["AP"] == pytest.approx(50.495, abs=1e-3)


def test_half_right_wrong_detection_ranked_first():
    # Ranked by score: FP (0.9) then TP (0.8).
    # recall = [0.0, 0.5], precision = [0.0, 0.5]; the interpolated precision
    # (max precision at recall >= r) is 0.5 at every recall point <= 0.5.
    # AP = 100 * 0.5 * 51/101 ~= 25.248.
    gt = _gt([(1, 1, BOX1), (2, 1, BOX2)])
    res = score_coco(gt, [_det(1, 1, BOX1, 0.8), _det(2, 1, MISS, 0.9)])["bbox"]
    assert res["AP"] == pytest.approx(100 * 0.5 * POINTS_UP_TO_HALF)


def test_per_class_ap_one_perfect_one_missed():
    gt = _gt([(1, 1, BOX1), (2, 2, BOX2)], cats=(("a", 1), ("b", 2)))
    res = score_coco(gt, [_det(1, 1, BOX1, 0.9), _det(2, 2, MISS, 0.9)])["bbox"]
    assert res["per_class"] == {"a": pytest.approx(100.0), "b": pytest.approx(0.0)}
    assert res["AP"] == pytest.approx(50.0)


def test_class_without_gt_is_none_and_not_averaged():
    gt = _gt([(1, 1, BOX1)], cats=(("a", 1), ("b", 2)), n_images=1)
    res = score_coco(gt, [_det(1, 1, BOX1, 0.9)])["bbox"]
    assert res["per_class"] == {"a": pytest.approx(100.0), "b": None}
    assert res["AP"] == pytest.approx(100.0)


def test_gt_from_path_and_detections_outside_gt_ignored(tmp_path):
    gt = _gt([(1, 1, BOX1), (2, 1, BOX2)])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    dets = [_det(1, 1, BOX1, 1.0), _det(2, 1, BOX2, 1.0), _det(99, 1, BOX1, 1.0)]
    res = score_coco(path, dets)
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    json.dumps(res)  # plain JSON-serialisable
    assert dets[0] == _det(1, 1, BOX1, 1.0)  # caller's detections not mutated


def _square_mask(top: int, left: int, size: int, hw: int = 64) -> np.ndarray:
    m = np.zeros((hw, hw), dtype=np.uint8)
    m[top : top + size, left : left + size] = 1
    return m


def test_segm_perfect_masks_through_to_coco_results():
    masks = [_square_mask(4, 6, 40), _square_mask(20, 10, 36)]
    gt = {
        "images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
        "annotations": [],
        "categories": [{"id": 7, "name": "thing"}],
    }
    outputs = []
    for img_id, m in enumerate(masks, start=1):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("utf-8")
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        gt["annotations"].append(
            {
                "id": img_id,
                "image_id": img_id,
                "category_id": 7,
                "bbox": [x, y, w, h],
                "area": float(m.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
        # soft probabilities: 0.9 inside the object, 0.2 outside
        prob = torch.from_numpy(m).float() * 0.7 + 0.2
        outputs.append(
            {
                "boxes": torch.tensor([[x, y, x + w, y + h]]),
                "scores": torch.tensor([0.95]),
                "labels": torch.tensor([1]),
                "masks": prob[None, None],
            }
        )
    dets = to_coco_results([1, 2], outputs, {1: 7})
    assert isinstance(dets[0]["segmentation"]["counts"], str)
    res = score_coco(gt, dets, iou_types=("bbox", "segm"))
    json.dumps(res)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["segm"]["per_class"] == {"thing": pytest.approx(100.0)}
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    empty = score_coco(gt, [], iou_types=("segm",))
    assert empty["segm"]["AP"] == 0.0


def test_to_coco_results_maps_labels_and_converts_boxes():
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.5, 2.5]]),
            "scores": torch.tensor([0.9, 0.3]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    dets = to_coco_results([5, 6], outputs, {1: 18, 2: 44})
    assert len(dets) == 2
    assert dets[0]["image_id"] == 5 and dets[0]["category_id"] == 18
    assert dets[0]["bbox"] == pytest.approx([10.0, 20.0, 40.0, 60.0])
    assert dets[0]["score"] == pytest.approx(0.9)
    assert dets[1]["category_id"] == 44
    assert dets[1]["bbox"] == pytest.approx([0.0, 0.0, 1.5, 2.5])
    assert "segmentation" not in dets[0]
    json.dumps(dets)


def test_to_coco_results_rejects_unknown_label():
    outputs = [
        {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([3])}
    ]
    with pytest.raises(ValueError):
        to_coco_results([1], outputs, {1: 1})
