"""`ssod label` of an image folder on a real local Ray: a corrupt image skipped, a --threshold, review grids,
--model-uri from a local MLflow registry, and bad input. The shared run and folder are in conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from labelrun import read_outputs, run_label
from PIL import Image
from pycocotools.coco import COCO

from pipeline.cli import main

pytestmark = pytest.mark.slow  # a local Ray, training runs


def _folder_args(folder: Path, out: Path, threshold: float) -> list[str]:
    """Label `folder` into `out` at `threshold`, with one review grid of 3 images."""
    return ["--images", str(folder), "--out", str(out), "--threshold", str(threshold), "--review", "3"]


@pytest.fixture(scope="module")
def folder_labels(ray_cluster, faster_run: Path, image_folder: Path, threshold: float, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder_labels")
    args = ["label", "--checkpoint", str(faster_run / "checkpoint.pt"), *_folder_args(image_folder, out, threshold)]
    assert main(args) == 0
    return out


def test_label_an_image_folder_skipping_a_corrupt_image(
    folder_labels: Path, image_folder: Path, label_prepared: Path, threshold: float
):
    labels, report, ranking = read_outputs(folder_labels)
    # ids follow the sorted relative paths; the skipped broken.png used one up
    names = sorted(
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*") if p.suffix in (".png", ".webp")
    )
    assert len(names) == 6 and names[-1] == "sub/five.webp"
    expected = [(i, name) for i, name in enumerate(names, start=1) if name != "broken.png"]
    assert sorted((i["id"], i["file_name"]) for i in labels["images"]) == expected
    for image in labels["images"]:
        with Image.open(image_folder / image["file_name"]) as pic:
            assert (image["width"], image["height"]) == pic.size
    categories = json.loads((label_prepared / "categories.json").read_text())
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


def test_model_uri_from_a_local_registry(
    ray_cluster, faster_run, image_folder, folder_labels, threshold, tmp_path, monkeypatch, capsys
):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.labeling.model import from_checkpoint
    from pipeline.tracking.tracker import Tracker
    from pipeline.training.setup import build_student_teacher

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
    registered = ("--model-uri", "models:/label-test/1")
    code, _, _ = run_label(capsys, *registered, *_folder_args(image_folder, out, threshold))
    assert code == 0
    labels, report, _ = read_outputs(out)
    reference, _, _ = read_outputs(folder_labels)

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
    code, _, err = run_label(
        capsys, *registered, "--model", "student", "--images", str(image_folder), "--out", str(out)
    )
    assert code == 2 and "teacher only" in err


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, faster_run, image_folder):
    images_out = ("--images", str(image_folder), "--out", str(tmp_path / "o"))
    code, _, err = run_label(capsys, "--checkpoint", str(tmp_path / "nope.pt"), *images_out)
    assert code == 2 and "nope.pt" in err and err.count("\n") == 1
    lonely = tmp_path / "lonely.pt"
    shutil.copy(faster_run / "checkpoint.pt", lonely)
    code, _, err = run_label(capsys, "--checkpoint", str(lonely), *images_out)
    assert code == 2 and "config.yaml" in err and "--config" in err
    code, _, err = run_label(capsys, "--checkpoint", str(faster_run), *images_out, "--threshold", "1.5")
    assert code == 2 and "--threshold" in err
