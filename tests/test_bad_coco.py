"""What `ssod prepare` counts, drops or refuses in a COCO set, and a sweep of mutated COCO files that must
be counted or refused, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from badinput import error_of
from cocofix import ann, dataset, image_entry, save_image, write_coco

from pipeline.data import schema
from pipeline.data.prepare import prepare
from pipeline.errors import InputError


# -- ssod prepare: counted and dropped -----------------------------------------------------------------
def _prepare_one(tmp_path: Path, anns: list[dict]) -> tuple[dict, list[dict]]:
    save_image(tmp_path / "images" / "a.png")  # 40 x 30
    coco = write_coco(tmp_path / "train.json", [image_entry(1, "a.png")], [ann(9, 1, [1, 1, 5, 5]), *anns])
    report = prepare(coco, tmp_path / "images", 100, 0, tmp_path / "out")
    return report, pq.read_table(tmp_path / "out" / schema.LABELED_DIR).to_pylist()


def test_bbox_that_is_a_string_is_dropped_and_counted(tmp_path):
    report, [row] = _prepare_one(tmp_path, [ann(1, 1, "1234"), ann(2, 1, [1, 2, 3]), ann(3, 1, None)])
    assert report["dropped_malformed_boxes"] == 3 and report["examples"]["dropped_malformed_boxes"] == ["a.png"]
    assert row["boxes"] == [[1, 1, 6, 6]]  # never the box [1, 2, 3, 4]


BAD_SEGMENTATIONS = {
    "a_string": "garbage",
    "a_polygon_of_two_points": [[1, 2, 3, 4]],
    "rle_of_another_size": {"size": [10, 10], "counts": [100]},
    "rle_counts_not_covering_the_image": {"size": [30, 40], "counts": [5, 5]},
    "rle_string_that_is_not_one": {"size": [30, 40], "counts": "zzzz"},
}


@pytest.mark.parametrize("segmentation", BAD_SEGMENTATIONS.values(), ids=BAD_SEGMENTATIONS.keys())
def test_segmentation_that_is_not_polygons_or_rle_is_dropped_and_counted(tmp_path, segmentation):
    good = ann(2, 1, [2, 2, 8, 8], segmentation={"size": [30, 40], "counts": [1200]})
    report, [row] = _prepare_one(tmp_path, [ann(1, 1, [10, 10, 5, 5], segmentation=segmentation), good])
    assert report["dropped_invalid_segmentations"] == 1
    assert len(row["boxes"]) == 3 and row["segmentations"][1] == ""  # the box stays, without its mask
    assert json.loads(row["segmentations"][2]) == good["segmentation"]


@pytest.fixture
def coco_set(tmp_path: Path) -> tuple[Path, Path]:
    path, images, _ = dataset(tmp_path / "coco", annotated=6, empty=2)
    return path, images


def test_prepare_out_onto_an_existing_file(coco_set, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "file: --out is an existing file" in error_of(prepare, *coco_set, 50, 0, tmp_path / "file")


def test_prepare_out_onto_a_prepared_dir_keeps_its_val_set(coco_set, tmp_path):
    path, images = coco_set
    prepare(path, images, 50, 0, tmp_path / "out", val_annotations=path, val_images=images)
    assert "holds a validation set" in error_of(prepare, path, images, 50, 0, tmp_path / "out")
    assert (tmp_path / "out" / schema.VAL_GT_FILE).exists() and list((tmp_path / "out" / schema.VAL_DIR).iterdir())


def test_prepare_out_onto_a_directory_that_is_no_prepared_set(coco_set):
    path, images = coco_set  # e.g. --out pointed at the images by mistake
    assert "holds no prepared set" in error_of(prepare, path, images, 50, 0, images)


def test_unlabeled_images_folder_without_images(coco_set, tmp_path):
    (tmp_path / "raw").mkdir()
    message = error_of(prepare, *coco_set, 50, 0, tmp_path / "out", unlabeled_images=tmp_path / "raw")
    assert "raw: --unlabeled-images holds no image files" in message


# -- sweeping: mutated COCO files are counted or refused, never a crash ---------------------------------
def _junk():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(10**20), 10**20)
        | st.sampled_from([10**400, -1, 0, 1, 2, 3])
        | st.floats(allow_subnormal=False)
        | st.text(max_size=6)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=8,
    )


def _mutation():
    """(part, index, field, value): set images/annotations/categories[index][field] = value (None: delete it)."""
    from hypothesis import strategies as st

    numbers = (
        st.integers(-2, 12)
        | st.floats(-1e9, 1e9, allow_subnormal=False)
        | st.sampled_from([float("nan"), float("inf"), 10**400])
    )
    box = st.lists(numbers, min_size=0, max_size=5) | _junk()
    polygon = st.lists(st.lists(numbers, max_size=10), max_size=3)
    rle = st.fixed_dictionaries(
        {
            "size": st.lists(st.integers(-1, 50), max_size=3) | _junk(),
            "counts": st.text("0123456789:;<=>?@AZaz", max_size=12) | st.lists(st.integers(-5, 1300), max_size=6),
        }
    )
    ids = st.integers(-1, 6) | st.booleans() | st.text(max_size=2) | st.none()
    names = (
        st.sampled_from(["a.png", "b.png", "c.png", "", "../a.png", "a\x00.png", "missing.png", "./b.png"]) | _junk()
    )
    fields = {
        "images": {"id": ids, "file_name": names, "width": _junk(), "height": _junk()},
        "annotations": {
            "id": ids,
            "image_id": ids,
            "category_id": ids,
            "bbox": box,
            "segmentation": polygon | rle | _junk(),
            "iscrowd": _junk(),
        },
        "categories": {"id": ids, "name": st.sampled_from(["cat", "dog", "bird", "CAT", ""]) | _junk()},
    }
    return st.sampled_from(sorted((part, field) for part, by_field in fields.items() for field in by_field)).flatmap(
        lambda pf: st.tuples(st.just(pf[0]), st.integers(0, 3), st.just(pf[1]), fields[pf[0]][pf[1]] | st.just(None))
    )


def _apply(coco: dict, mutations: list) -> dict:
    coco = json.loads(json.dumps(coco))
    for part, index, name, value in mutations:
        entries = coco[part]
        entry = entries[index % len(entries)]
        if value is None:
            entry.pop(name, None)
        else:
            entry[name] = value
    return coco


def test_mutated_coco_files_are_counted_or_refused_never_a_crash(tmp_path_factory):
    import math
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    root = tmp_path_factory.mktemp("mutated")
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        save_image(root / "images" / name, seed=i)  # 40 x 30
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    base = {
        "images": [image_entry(i + 1, n) for i, n in enumerate(["a.png", "b.png", "c.png"])],
        "annotations": [
            ann(1, 1, [1, 1, 10, 10], 1, segmentation=[[1, 1, 10, 1, 10, 10]]),
            ann(2, 2, [5, 5, 20, 10], 2),
            ann(3, 3, [0, 0, 39, 29], 3),
            ann(4, 1, [20, 10, 5, 5], 2),
        ],
        "categories": categories,
    }

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(_mutation(), min_size=1, max_size=6))
    def counted_or_refused(mutations):
        coco = _apply(base, mutations)
        work = Path(tempfile.mkdtemp(dir=root))
        (work / "train.json").write_text(json.dumps(coco))
        try:
            report = prepare(work / "train.json", root / "images", 50, 0, work / "out")
        except InputError as err:
            assert "\n" not in str(err)
            return
        rows = [
            r
            for split in (schema.LABELED_DIR, schema.UNLABELED_DIR)
            for r in pq.read_table(work / "out" / split).to_pylist()
        ]
        boxes = [(b, label, r) for r in rows for b, label in zip(r["boxes"], r["labels"])]
        assert len(boxes) == report["annotations_kept"]
        kept_categories = len(json.loads((work / "out" / schema.CATEGORIES_FILE).read_text()))
        for (x1, y1, x2, y2), label, row in boxes:  # only boxes it accepted: inside the image, a known class
            assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= row["width"] and 0 <= y1 < y2 <= row["height"]
            assert 1 <= label <= kept_categories

    counted_or_refused()
