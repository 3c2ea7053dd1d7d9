"""`ssod prepare` on small real COCO sets written to tmp_path: split, Parquet round trip, bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from cocofix import (
    CATEGORIES,
    LABEL_OF,
    SIZE,
    ann,
    image_entry,
    pixels,
    rows,
    run_one,
    save_image,
    truncate,
    write_coco,
)
from PIL import Image

from pipeline.data import schema
from pipeline.data.prepare import prepare
from pipeline.errors import InputError


def test_split_is_deterministic_and_covers_every_image(coco_set, tmp_path):
    path, images, coco = coco_set
    first = prepare(path, images, 10, 1, tmp_path / "a")
    prepare(path, images, 10, 1, tmp_path / "b")
    prepare(path, images, 10, 2, tmp_path / "c")
    shuffled = tmp_path / "shuffled.json"  # same ids in another order: same split
    shuffled.write_text(json.dumps({**coco, "images": coco["images"][::-1]}))
    prepare(shuffled, images, 10, 1, tmp_path / "d")
    split_a, split_b, split_c, split_d = (json.loads((tmp_path / d / schema.SPLIT_FILE).read_text()) for d in "abcd")
    assert split_a == split_b == split_d
    assert split_a["labeled"] != split_c["labeled"]
    assert (first["labeled"], first["unlabeled"], first["val"]) == (5, 48, 0)
    assert split_a["num_labeled"] == 5 and split_a["num_unlabeled"] == 48 and split_a["num_val"] == 0
    all_ids = {img["id"] for img in coco["images"]}
    annotated_ids = {a["image_id"] for a in coco["annotations"]}
    assert set(split_a["labeled"]) <= annotated_ids
    assert set(split_a["labeled"]) | set(split_a["unlabeled"]) == all_ids
    assert not set(split_a["labeled"]) & set(split_a["unlabeled"])
    assert split_a["labeled"] == sorted(split_a["labeled"]) and split_a["percent"] == 10 and split_a["seed"] == 1
    assert [r["image_id"] for r in rows(tmp_path / "a", schema.LABELED_DIR)] == split_a["labeled"]


def test_tiny_percent_still_labels_one_image(coco_set, tmp_path):
    path, images, _ = coco_set
    assert prepare(path, images, 0.1, 0, tmp_path / "out")["labeled"] == 1


def test_parquet_round_trip_keeps_bytes_and_annotations(coco_set, tmp_path):
    path, images, coco = coco_set
    out = tmp_path / "out"
    report = prepare(path, images, 100, 0, out, shard_rows=8)
    assert (report["labeled"], report["unlabeled"], report["annotations_kept"]) == (50, 3, 75)
    labeled = rows(out, schema.LABELED_DIR)
    assert len(list((out / schema.LABELED_DIR).glob("part-*.parquet"))) == 7
    assert max(pq.ParquetFile(p).metadata.num_rows for p in (out / schema.LABELED_DIR).iterdir()) == 8
    entries = {img["id"]: img for img in coco["images"]}
    for row in labeled + rows(out, schema.UNLABELED_DIR):
        assert row["image"] == (images / entries[row["image_id"]]["file_name"]).read_bytes()
        expected = [a for a in coco["annotations"] if a["image_id"] == row["image_id"]]
        assert row["boxes"] == [pytest.approx([x, y, x + w, y + h]) for x, y, w, h in (a["bbox"] for a in expected)]
        assert row["labels"] == [LABEL_OF[a["category_id"]] for a in expected]
        assert row["segmentations"] == [json.dumps(a["segmentation"]) if "segmentation" in a else "" for a in expected]
        assert (row["width"], row["height"], row["annotated"]) == (*SIZE, True)
    assert {r["file_name"][-3:] for r in labeled} == {"jpg", "png"}
    categories = json.loads((out / schema.CATEGORIES_FILE).read_text())
    assert categories == [{**c, "label": LABEL_OF[c["id"]]} for c in CATEGORIES]
    assert json.loads((out / schema.REPORT_FILE).read_text()) == report


def test_unlabeled_ground_truth_and_extra_images(coco_set, tmp_path):
    path, images, coco = coco_set
    extra = tmp_path / "raw"
    save_image(extra / "b.png")
    save_image(extra / "sub" / "a.bmp", fmt="BMP")
    (extra / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    report = prepare(path, images, 10, 0, out, unlabeled_images=extra)
    assert (report["extra_unlabeled"], report["unlabeled"], report["converted_images"]) == (2, 50, 1)
    extras = [r for r in rows(out, schema.UNLABELED_DIR) if not r["annotated"]]
    max_id = max(img["id"] for img in coco["images"])
    assert [(r["image_id"], r["file_name"]) for r in extras] == [(max_id + 1, "b.png"), (max_id + 2, "sub/a.bmp")]
    assert extras[0]["image"] == (extra / "b.png").read_bytes() and extras[1]["boxes"] == []
    assert Image.open(io.BytesIO(extras[1]["image"])).format == "PNG"
    gt = json.loads((out / schema.UNLABELED_GT_FILE).read_text())
    split = json.loads((out / schema.SPLIT_FILE).read_text())
    assert sorted(img["id"] for img in gt["images"]) == [i for i in split["unlabeled"] if i <= max_id]
    assert {a["image_id"] for a in gt["annotations"]} <= set(split["unlabeled"])


def test_val_split_and_ground_truth(coco_set, tmp_path):
    path, images, _ = coco_set
    save_image(tmp_path / "val" / "v.png")
    val_images = [image_entry(5, "v.png"), image_entry(6, "gone.png")]
    val = write_coco(tmp_path / "val.json", val_images, [ann(1, 5, [0, 0, 5, 5])])
    out = tmp_path / "out"
    report = prepare(path, images, 50, 0, out, val_annotations=val, val_images=tmp_path / "val")
    assert (report["val"], report["missing_images"]) == (1, 1)
    assert [(r["image_id"], r["boxes"]) for r in rows(out, schema.VAL_DIR)] == [(5, [[0, 0, 5, 5]])]
    gt = json.loads((out / schema.VAL_GT_FILE).read_text())
    assert [img["id"] for img in gt["images"]] == [5] and [a["id"] for a in gt["annotations"]] == [1]
    assert json.loads((out / schema.SPLIT_FILE).read_text())["num_val"] == 1
    with pytest.raises(InputError, match="--val-images"):
        prepare(path, images, 50, 0, out, val_annotations=val)


@pytest.mark.parametrize("percent", [0, -5, 150, float("nan")])
def test_percent_out_of_range(coco_set, tmp_path, percent):
    path, images, _ = coco_set
    with pytest.raises(InputError, match="--percent"):
        prepare(path, images, percent, 0, tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": [\n  {"id": 1,', r"line 2, column"),
        ("[1, 2]", "not a COCO annotations file"),
        ('{"images": [], "annotations": []}', "'categories'"),
        ('{"images": [{"id": "x", "file_name": "a.png"}], "annotations": [], "categories": []}', "non-integer id"),
        ('{"images": [{"file_name": "a.png"}], "annotations": [], "categories": []}', r"images\[0\]"),
    ],
)
def test_malformed_annotation_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match=message) as err:
        prepare(path, tmp_path / "images", 10, 0, tmp_path / "out")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_annotations_file_and_images_dir(coco_set, tmp_path):
    path, images, _ = coco_set
    with pytest.raises(InputError, match="not found") as err:
        prepare(tmp_path / "nope.json", images, 10, 0, tmp_path / "out")
    assert "nope.json" in str(err.value)
    with pytest.raises(InputError, match="images directory not found"):
        prepare(path, tmp_path / "no_images", 10, 0, tmp_path / "out")


def test_no_usable_annotation_is_an_error(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match="no image has a usable annotation"):
        run_one(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, [0, 0, 0, 5]), ann(2, 1, [0, 0, 5, 5], 99)])


def test_missing_and_corrupt_images_are_skipped(tmp_path):
    folder = tmp_path / "images"
    save_image(folder / "ok.png")
    truncate(save_image(folder / "half.png"))
    truncate(save_image(folder / "half.jpg", fmt="JPEG"))
    (folder / "junk.png").write_bytes(b"\x89PNG not really")
    names = ["ok.png", "half.png", "half.jpg", "junk.png", "missing.png"]
    images = [image_entry(i, name) for i, name in enumerate(names, 1)]
    report, out = run_one(tmp_path, images, [ann(i, i, [0, 0, 5, 5]) for i in range(1, 6)])
    assert (report["corrupt_images"], report["missing_images"], report["labeled"]) == (3, 1, 1)
    assert report["examples"]["corrupt_images"] == ["half.png", "half.jpg", "junk.png"]
    assert report["examples"]["missing_images"] == ["missing.png"]
    assert json.loads((out / schema.SPLIT_FILE).read_text())["labeled"] == [1]


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB;16", "PNG")],
)
def test_non_rgb_images_are_converted_to_rgb_png(tmp_path, mode, fmt):
    path = save_image(tmp_path / "images" / "a.img", mode=mode, fmt=fmt)
    report, out = run_one(tmp_path, [image_entry(1, "a.img")], [ann(1, 1, [0, 0, 5, 5])])
    assert report["converted_images"] == 1 and report["examples"]["converted_images"] == ["a.img"]
    (row,) = rows(out, schema.LABELED_DIR)
    stored = Image.open(io.BytesIO(row["image"]))
    assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", SIZE)
    assert row["image"] != path.read_bytes()
    if mode == "I;16":
        expected = np.rint(np.asarray(pixels("I;16"), dtype=np.float64) / 257).astype(np.uint8)
        assert np.array_equal(np.asarray(stored)[:, :, 0], expected)


def test_box_cleaning(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    anns = [
        ann(1, 1, [2, 3, 4, 5]),  # kept as is
        ann(2, 1, [5, 5, 0, 4]),  # zero width
        ann(3, 1, [5, 5, 4, -1]),  # negative height
        ann(4, 1, [5, 5, float("nan"), 4]),  # not finite
        ann(5, 1, [-5, 20, 10, 30], 7),  # partly outside: clipped to [0, 20, 5, 30]
        ann(6, 1, [50, 5, 4, 4]),  # fully outside
        ann(7, 1, [1, 1, 4, 4], 42),  # unknown category
        ann(8, 1, [1, 1, 4, 4], iscrowd=1),  # crowd: not trained on
        ann(8, 1, [3, 3, 2, 2], 12),  # duplicate id: kept
        ann(9, 77, [1, 1, 4, 4]),  # image 77 does not exist
    ]
    report, out = run_one(tmp_path, [image_entry(1, "a.png")], anns)
    counts = {k: report[k] for k in report if isinstance(report[k], int) and report[k] and k not in ("labeled",)}
    assert counts == {
        "dropped_degenerate_boxes": 3,
        "clipped_boxes": 1,
        "dropped_outside_boxes": 1,
        "unknown_category_annotations": 1,
        "crowd_annotations": 1,
        "duplicate_annotation_ids": 1,
        "orphan_annotations": 1,
        "categories": 3,
        "annotations_kept": 3,
    }
    (row,) = rows(out, schema.LABELED_DIR)
    assert row["boxes"] == [[2, 3, 6, 8], [0, 20, 5, 30], [3, 3, 5, 5]]
    assert row["labels"] == [1, 2, 3] and row["segmentations"] == ["", "", ""]
    assert report["examples"]["clipped_boxes"] == ["a.png"]
    assert json.loads((out / schema.SPLIT_FILE).read_text())["unlabeled"] == []


def test_real_image_size_wins_over_json(tmp_path):
    save_image(tmp_path / "images" / "a.png", size=(20, 10))
    report, out = run_one(tmp_path, [image_entry(1, "a.png", size=(40, 30))], [ann(1, 1, [10, 5, 30, 30])])
    assert (report["size_mismatch_images"], report["clipped_boxes"]) == (1, 1)
    (row,) = rows(out, schema.LABELED_DIR)
    assert (row["width"], row["height"], row["boxes"]) == (20, 10, [[10, 5, 20, 10]])


def test_empty_unlabeled_split_is_still_a_valid_parquet_dir(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    report, out = run_one(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, [0, 0, 5, 5])])
    assert report["unlabeled"] == 0 and pq.read_table(out / schema.UNLABELED_DIR).num_rows == 0
    assert json.loads((out / schema.UNLABELED_GT_FILE).read_text())["images"] == []
