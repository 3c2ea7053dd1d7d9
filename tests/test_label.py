"""`ssod label` end to end on a real local Ray: an image folder and a prepared split, Faster and Mask R-CNN,
a corrupt image, --model-uri from a local MLflow registry, and train -> label -> prepare -> train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cocofix import truncate
from conftest import tiny_config
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.cli import main
from pipeline.data.prepare import prepare
from pipeline.data.synth import generate
from pipeline.training.local import train_local

pytestmark = pytest.mark.slow  # a local Ray, training runs


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("label_synth")
    generate(root, 40, seed=5, masks=True)
    return root


@pytest.fixture(scope="module")
def small_prepared(coco: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("label_prepared")
    prepare(
        coco / "train" / "annotations.json",
        coco / "train" / "images",
        25,
        0,
        out,
        val_annotations=coco / "val" / "annotations.json",
        val_images=coco / "val" / "images",
    )
    return out


def _train(prepared: Path, run_dir: Path, *overrides: str) -> Path:
    cfg = tiny_config(
        prepared,
        run_dir,
        "train.backend=local",
        "train.steps=2",
        "ssl.burn_in_steps=2",
        "data.eval_images=2",
        *overrides,
    )
    train_local(cfg)
    return run_dir


@pytest.fixture(scope="module")
def faster_run(small_prepared: Path, tmp_path_factory) -> Path:
    return _train(small_prepared, tmp_path_factory.mktemp("faster") / "run")


@pytest.fixture(scope="module")
def folder(coco: Path, tmp_path_factory) -> Path:
    """Five good images (one in a subfolder, one WebP), a truncated PNG and a text file."""
    root, source = tmp_path_factory.mktemp("raw"), coco / "train" / "images"
    names = sorted(p.name for p in source.glob("*.png"))[:6]
    (root / "sub").mkdir()
    for name in names[:3]:
        shutil.copy(source / name, root / name)
    shutil.copy(source / names[3], root / "sub" / names[3])
    Image.open(source / names[4]).convert("RGB").save(root / "sub" / "five.webp")
    truncate(shutil.copy(source / names[5], root / "broken.png"))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def threshold(faster_run: Path, folder: Path) -> float:
    """The teacher's median detection score on one image: a threshold that keeps some boxes and drops some."""
    import torch

    from models.builders import build_detector
    from models.pseudo_labels import teacher_detections
    from pipeline.data.augment import to_float
    from pipeline.data.rows import decode_image_bytes
    from pipeline.labeling.model import from_checkpoint

    trained = from_checkpoint(faster_run, None, [], "teacher")
    model = build_detector(len(trained.categories), **trained.cfg.model.model_dump(), init_weights=False)
    model.load_state_dict(trained.state)
    image = to_float(decode_image_bytes((folder / "sub" / "five.webp").read_bytes()))
    scores = teacher_detections(model, [image])[0]["scores"]
    assert len(scores) > 10, "the teacher detected next to nothing"
    return round(float(torch.median(scores)), 4)


def _label(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["label", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _read(out: Path) -> tuple[dict, dict, dict]:
    return tuple(json.loads((out / name).read_text()) for name in ("labels.json", "label_report.json", "review.json"))


@pytest.fixture(scope="module")
def folder_labels(ray_cluster, faster_run: Path, folder: Path, threshold: float, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder_labels")
    assert (
        main(
            [
                "label",
                "--checkpoint",
                str(faster_run / "checkpoint.pt"),
                "--images",
                str(folder),
                "--out",
                str(out),
                "--threshold",
                str(threshold),
                "--review",
                "3",
            ]
        )
        == 0
    )
    return out


def test_label_an_image_folder_skipping_a_corrupt_image(
    folder_labels: Path, folder: Path, small_prepared: Path, threshold: float
):
    labels, report, ranking = _read(folder_labels)
    # ids follow the sorted relative paths; the skipped broken.png used one up
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".webp"))
    assert len(names) == 6 and names[-1] == "sub/five.webp"
    expected = [(i, name) for i, name in enumerate(names, start=1) if name != "broken.png"]
    assert sorted((i["id"], i["file_name"]) for i in labels["images"]) == expected
    for image in labels["images"]:
        with Image.open(folder / image["file_name"]) as pic:
            assert (image["width"], image["height"]) == pic.size
    categories = json.loads((small_prepared / "categories.json").read_text())
    assert labels["categories"] == [{"id": c["id"], "name": c["name"]} for c in categories]
    anns = labels["annotations"]
    assert anns and all(a["score"] >= threshold for a in anns)
    assert len(anns) < 100 * 5, "the threshold dropped nothing"  # torchvision keeps 100 detections per image
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=0.02) for a in anns)
    assert len(COCO(str(folder_labels / "labels.json")).getAnnIds()) == len(anns)
    assert (report["images_found"], report["images_read"]) == (6, 5)
    assert report["images_skipped"] == {"undecodable": 1} and report["skipped_examples"] == {
        "undecodable": ["broken.png"]
    }
    assert report["boxes"] == len(anns) == sum(report["boxes_per_class"].values())
    assert report["threshold"]["rule"] == "--threshold" and set(report["threshold"]["per_class"].values()) == {
        threshold
    }
    assert report["quality"] is None  # a raw folder has no held-aside labels
    keys = [(-r["uncertainty"], r["mean_score"], r["image_id"]) for r in ranking["images"]]
    assert keys == sorted(keys) and len(keys) == 5 and ranking["images_ranked"] == 5
    assert ranking["grids"] == ["review/grid_00.png"]
    assert Image.open(folder_labels / "review" / "grid_00.png").size[0] > 3 * 128


def test_label_a_prepared_split_reports_precision_recall_and_a_sweep(
    ray_cluster, faster_run, small_prepared, tmp_path, capsys
):
    out = tmp_path / "split"
    code, printed, _ = _label(
        capsys,
        "--checkpoint",
        str(faster_run),
        "--prepared",
        str(small_prepared),
        "--split",
        "unlabeled",
        "--out",
        str(out),
        "--sweep",
    )
    assert code == 0
    labels, report, _ = _read(out)
    split = json.loads((small_prepared / "split.json").read_text())
    assert sorted(i["id"] for i in labels["images"]) == split["unlabeled"]
    held_aside = json.loads((small_prepared / "unlabeled_annotations.json").read_text())["annotations"]
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
def mask_run(small_prepared: Path, tmp_path_factory) -> Path:
    return _train(small_prepared, tmp_path_factory.mktemp("mask") / "run", "model.arch=mask_rcnn")


def test_mask_rcnn_labels_carry_rle_masks(ray_cluster, mask_run, small_prepared, tmp_path, capsys):
    out = tmp_path / "masks"
    code, _, _ = _label(
        capsys,
        "--checkpoint",
        str(mask_run / "checkpoint.pt"),
        "--prepared",
        str(small_prepared),
        "--split",
        "val",
        "--out",
        str(out),
        "--review",
        "2",
    )
    assert code == 0
    labels, report, _ = _read(out)
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


def test_model_uri_from_a_local_registry(
    ray_cluster, faster_run, folder, folder_labels, threshold, tmp_path, monkeypatch, capsys
):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.labeling.model import from_checkpoint
    from pipeline.tracking.tracker import Tracker
    from pipeline.training.session import build_student_teacher

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trained = from_checkpoint(faster_run / "checkpoint.pt", None, [], "teacher")
    cfg = trained.cfg.with_overrides(
        {"tracking.enabled": True, "tracking.uri": uri, "tracking.registered_model_name": "label-test"}
    )
    _, teacher = build_student_teacher(cfg, len(trained.categories), torch.device("cpu"))
    teacher.load_state_dict(trained.state)
    tracker = Tracker(cfg, faster_run, run_name="registered")
    tracker.start()
    tracker.finish({"steps": 2, "thresholds": {c["name"]: 0.05 for c in trained.categories}}, teacher)

    out = tmp_path / "from_registry"
    code, _, _ = _label(
        capsys,
        "--model-uri",
        "models:/label-test/1",
        "--images",
        str(folder),
        "--out",
        str(out),
        "--threshold",
        str(threshold),
        "--review",
        "3",
    )
    assert code == 0
    labels, report, _ = _read(out)
    reference, _, _ = _read(folder_labels)

    def boxes(coco: dict) -> list:
        return sorted((a["image_id"], a["category_id"], a["score"], tuple(a["bbox"])) for a in coco["annotations"])

    assert boxes(labels) == boxes(reference) and report["model"] == "models:/label-test/1"
    # the bundle's config tracks: the label run and its review grids are in the same store
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        "attributes.run_name = 'label-from_registry'",
    )
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "review")] == ["review/grid_00.png"]
    assert runs[0].data.metrics["final/images_read"] == 5
    mlflow.set_tracking_uri(None)
    code, _, err = _label(
        capsys, "--model-uri", "models:/label-test/1", "--model", "student", "--images", str(folder), "--out", str(out)
    )
    assert code == 2 and "teacher only" in err


def test_round_trip_train_label_prepare_train(
    ray_cluster, faster_run, small_prepared, coco, threshold, tmp_path, capsys
):
    out = tmp_path / "round"
    assert (
        _label(
            capsys,
            "--checkpoint",
            str(faster_run),
            "--prepared",
            str(small_prepared),
            "--out",
            str(out),
            "--threshold",
            str(threshold),
            "--review",
            "0",
        )[0]
        == 0
    )
    labels = json.loads((out / "labels.json").read_text())
    with_boxes = {a["image_id"] for a in labels["annotations"]}
    assert with_boxes, "the teacher kept no box: nothing to train on"
    second = tmp_path / "prepared2"
    report = prepare(
        out / "labels.json",
        coco / "train" / "images",
        50,
        0,
        second,
        val_annotations=coco / "val" / "annotations.json",
        val_images=coco / "val" / "images",
    )
    val = json.loads((coco / "val" / "annotations.json").read_text())["annotations"]
    assert report["annotations_kept"] == len(labels["annotations"]) + len(val)  # every label box survives cleaning
    assert report["labeled"] == max(1, round(len(with_boxes) / 2))
    assert report["labeled"] + report["unlabeled"] == len(labels["images"])
    metrics = train_local(
        tiny_config(
            second,
            tmp_path / "run2",
            "train.backend=local",
            "train.steps=2",
            "ssl.burn_in_steps=1",
            "data.eval_images=2",
        )
    )
    assert metrics["steps"] == 2 and metrics["pseudo_labeled_images"] > 0


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, faster_run, folder):
    code, _, err = _label(
        capsys, "--checkpoint", str(tmp_path / "nope.pt"), "--images", str(folder), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "nope.pt" in err and err.count("\n") == 1
    lonely = tmp_path / "lonely.pt"
    shutil.copy(faster_run / "checkpoint.pt", lonely)
    code, _, err = _label(capsys, "--checkpoint", str(lonely), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "config.yaml" in err and "--config" in err
    code, _, err = _label(
        capsys,
        "--checkpoint",
        str(faster_run),
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "o"),
        "--threshold",
        "1.5",
    )
    assert code == 2 and "--threshold" in err
