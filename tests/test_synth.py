"""`pipeline.data.synth.generate`: deterministic, long-tailed, valid COCO output with optional polygons."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.synth import CLASS_NAMES, CLASS_WEIGHTS, generate
from pipeline.errors import InputError

SPLITS = ("train", "val")
# pycocotools's decode trips a NumPy 2 deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / split / "annotations.json").read_text())


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """60 images each: seed 7 in one process, seed 7 with two workers, seed 8."""
    runs = {"a": (7, 1), "b": (7, 2), "other": (8, 1)}
    roots = {}
    for key, (seed, workers) in runs.items():
        roots[key] = tmp_path_factory.mktemp(key) / "out"
        generate(roots[key], 60, seed, workers=workers)
    return roots


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("big") / "out"
    return root, generate(root, 600, 3, masks=True)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(small_runs: dict[str, Path]) -> None:
    a, b = _files(small_runs["a"]), _files(small_runs["b"])
    assert len(a) == 60 + 2
    assert a.keys() == b.keys()
    assert all(a[name] == b[name] for name in a)


def test_other_seed_gives_other_data(small_runs: dict[str, Path]) -> None:
    a, other = _files(small_runs["a"]), _files(small_runs["other"])
    assert a["train/annotations.json"] != other["train/annotations.json"]
    assert a["train/images/000001.png"] != other["train/images/000001.png"]


def test_split_sizes_and_no_polygons_without_masks(small_runs: dict[str, Path]) -> None:
    train, val = _load(small_runs["a"], "train"), _load(small_runs["a"], "val")
    assert (len(train["images"]), len(val["images"])) == (48, 12)
    assert all("segmentation" not in ann for ann in train["annotations"] + val["annotations"])


def test_classes_are_long_tailed(big_run: tuple[Path, dict]) -> None:
    root, summary = big_run
    train = _load(root, "train")
    anns = train["annotations"] + _load(root, "val")["annotations"]
    counts = Counter(ann["category_id"] for ann in anns)
    assert len(CLASS_NAMES) == len(CLASS_WEIGHTS) >= 6
    assert set(counts) == set(range(1, len(CLASS_NAMES) + 1))
    assert max(counts.values()) >= 10 * min(counts.values())
    train_counts = Counter(ann["category_id"] for ann in train["annotations"])
    assert summary["class_histogram"] == {name: train_counts[i + 1] for i, name in enumerate(CLASS_NAMES)}


def test_categories_are_listed_in_both_splits(big_run: tuple[Path, dict]) -> None:
    root, _ = big_run
    expected = [(i + 1, name) for i, name in enumerate(CLASS_NAMES)]
    for split in SPLITS:
        assert [(c["id"], c["name"]) for c in _load(root, split)["categories"]] == expected


def test_image_and_object_sizes(big_run: tuple[Path, dict]) -> None:
    root, _ = big_run
    for split in SPLITS:
        data = _load(root, split)
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        assert all(160 <= w <= 256 and 160 <= h <= 256 for w, h in sizes.values())
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert 4 <= max(w, h) <= 64
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        longest = np.array([max(ann["bbox"][2:]) for ann in data["annotations"]])
        assert np.mean(longest >= 6) > 0.99
        assert longest.min() < 12 and longest.max() > 45


def test_empty_images_and_summary(big_run: tuple[Path, dict]) -> None:
    root, summary = big_run
    empty = 0
    for split in SPLITS:
        data = _load(root, split)
        assert summary[f"{split}_images"] == len(data["images"])
        assert summary[f"{split}_annotations"] == len(data["annotations"])
        empty += len({img["id"] for img in data["images"]} - {a["image_id"] for a in data["annotations"]})
    assert summary["empty_images"] == empty
    assert 0.03 * 600 <= empty <= 0.15 * 600
    assert (summary["train_images"], summary["val_images"]) == (480, 120)


def test_polygons_decode_to_matching_masks(big_run: tuple[Path, dict]) -> None:
    root, _ = big_run
    for split in SPLITS:
        data = _load(root, split)
        sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
        for ann in data["annotations"]:
            seg = ann["segmentation"]
            assert len(seg) == 1 and len(seg[0]) >= 6 and len(seg[0]) % 2 == 0
            rles = mask_utils.frPyObjects(seg, *sizes[ann["image_id"]])
            assert mask_utils.decode(rles).sum() > 0
            # Rasterising drops thin tips (star points) of a pixel or two; the boxes agree within 4 px.
            assert np.allclose(mask_utils.toBbox(mask_utils.merge(rles)), ann["bbox"], atol=4)
            xy = np.array(seg[0]).reshape(-1, 2)
            shoelace = abs(np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], -1))) / 2
            assert ann["area"] == pytest.approx(shoelace, abs=0.05)


def test_coco_api_loads_and_images_exist(big_run: tuple[Path, dict]) -> None:
    root, _ = big_run
    for split in SPLITS:
        coco = COCO(str(root / split / "annotations.json"))
        for img in coco.dataset["images"]:
            assert (root / split / "images" / img["file_name"]).is_file()
        for img in coco.dataset["images"][:20]:
            with Image.open(root / split / "images" / img["file_name"]) as pic:
                assert (pic.format, pic.mode, pic.size) == ("PNG", "RGB", (img["width"], img["height"]))


def test_bad_input_is_rejected(tmp_path: Path, small_runs: dict[str, Path]) -> None:
    with pytest.raises(InputError):
        generate(tmp_path / "one", 1, 0)
    with pytest.raises(InputError):
        generate(small_runs["a"], 10, 0)


def test_small_layout_is_crowded_with_small_objects(tmp_path: Path, big_run: tuple[Path, dict]) -> None:
    summary = generate(tmp_path / "small", 40, 0, layout="small")
    data = json.loads((tmp_path / "small" / "train" / "annotations.json").read_text())
    per_image = len(data["annotations"]) / summary["train_images"]
    standard = big_run[1]["train_annotations"] / big_run[1]["train_images"]
    assert per_image > 3 * standard  # many objects per image
    sides = sorted(max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"])
    assert sides[len(sides) // 2] <= 16.0  # and small ones
    with pytest.raises(InputError, match="--layout"):
        generate(tmp_path / "bad", 10, 0, layout="huge")
