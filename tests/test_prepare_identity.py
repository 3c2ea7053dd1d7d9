"""`ssod prepare` and the identity of what it reads: image ids, file names, category ids and names across files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cocofix import CATEGORIES, LABEL_OF, ann, image_entry, rows, run_one, save_image, write_coco

from pipeline.data import schema
from pipeline.data.prepare import prepare
from pipeline.errors import InputError


def test_duplicate_image_ids(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match="duplicate image id 4") as err:
        run_one(tmp_path, [image_entry(4, "a.png"), image_entry(4, "a.png")], [ann(1, 4, [0, 0, 5, 5])])
    assert "train.json" in str(err.value)


def test_duplicate_file_names_keep_the_first_image_and_count_the_rest(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    save_image(tmp_path / "images" / "b.png", seed=1)
    images = [image_entry(1, "a.png"), image_entry(2, "./a.png"), image_entry(3, "b.png")]
    anns = [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [20, 10, 9, 9]), ann(3, 3, [2, 2, 4, 4])]
    report, out = run_one(tmp_path, images, anns)
    assert report["duplicate_file_names"] == 1 and report["examples"]["duplicate_file_names"] == ["./a.png (image 2)"]
    labeled = rows(out, schema.LABELED_DIR)
    assert [(r["image_id"], r["boxes"]) for r in labeled] == [(1, [[1, 1, 6, 6]]), (3, [[2, 2, 6, 6]])]


def test_categories_that_share_a_name_are_refused(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    categories = [*CATEGORIES, {"id": 20, "name": "dog"}]
    coco = write_coco(tmp_path / "train.json", [image_entry(1, "a.png")], [ann(1, 1, [1, 1, 5, 5])], categories)
    with pytest.raises(InputError) as err:
        prepare(coco, tmp_path / "images", 100, 0, tmp_path / "out")
    assert str(err.value) == f"{coco}: categories 7 and 20 share the name 'dog'"


def test_a_bool_is_no_image_or_category_id(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    anns = [ann(1, 1, [1, 1, 5, 5]), ann(2, True, [2, 2, 5, 5]), ann(3, 1, [3, 3, 5, 5], category_id=True)]
    with_one = [{"id": 1, "name": "one"}, *CATEGORIES]
    coco = write_coco(tmp_path / "train.json", [image_entry(1, "a.png")], anns, with_one)
    report = prepare(coco, tmp_path / "images", 100, 0, tmp_path / "out")
    assert report["orphan_annotations"] == 1 and report["unknown_category_annotations"] == 1
    assert [r["boxes"] for r in rows(tmp_path / "out", schema.LABELED_DIR)] == [[[1, 1, 6, 6]]]


def _val_set(tmp_path: Path, categories: list[dict], category_id: int) -> Path:
    save_image(tmp_path / "val" / "v.png")
    return write_coco(
        tmp_path / "val.json", [image_entry(5, "v.png")], [ann(1, 5, [0, 0, 5, 5], category_id)], categories
    )


def test_val_categories_are_matched_to_train_by_name(coco_set, tmp_path):
    path, images, _ = coco_set
    zero_based = [{"id": i, "name": c["name"]} for i, c in enumerate(reversed(CATEGORIES))]  # bird 0, dog 1, cat 2
    val = _val_set(tmp_path, zero_based, 1)  # a dog
    out = tmp_path / "out"
    report = prepare(path, images, 50, 0, out, val_annotations=val, val_images=tmp_path / "val")
    assert report["remapped_val_categories"] == 3
    [row] = rows(out, schema.VAL_DIR)
    assert row["labels"] == [LABEL_OF[7]]  # train's dog
    gt = json.loads((out / schema.VAL_GT_FILE).read_text())
    assert [a["category_id"] for a in gt["annotations"]] == [7] and gt["categories"] == CATEGORIES


def test_a_val_category_that_train_lacks_is_named(coco_set, tmp_path):
    path, images, _ = coco_set
    val = _val_set(tmp_path, [*CATEGORIES, {"id": 13, "name": "zebra"}], 13)
    with pytest.raises(InputError) as err:
        prepare(path, images, 50, 0, tmp_path / "out", val_annotations=val, val_images=tmp_path / "val")
    assert str(err.value) == f"{val}: category 'zebra' (id 13) is not a category of {path} ('cat', 'dog', 'bird')"


def test_extra_images_that_are_train_images_are_not_unlabeled_twice(coco_set, tmp_path):
    path, images, coco = coco_set
    report = prepare(path, images, 50, 0, tmp_path / "out", unlabeled_images=images)
    assert report["extra_images_already_listed"] == len(coco["images"]) and report["extra_unlabeled"] == 0


def test_prepare_refusal_from_the_cli_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    save_image(tmp_path / "images" / "a.png")
    categories = [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]
    coco = write_coco(tmp_path / "train.json", [image_entry(1, "a.png")], [ann(1, 1, [1, 1, 5, 5], 1)], categories)
    argv = ["prepare", "--annotations", str(coco), "--images", str(tmp_path / "images"), "--percent", "50"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {coco}: duplicate category id 1\n"
