"""The local runner end to end: burn-in, mutual learning, metrics.json, checkpoints, evaluate, resume."""

import json

import pytest
from conftest import PRETRAINED, ROOT, cli, prepare_split, sets, tiny_config

from pipeline.data.synth import generate
from pipeline.errors import InputError
from pipeline.tracking.console import print_sink
from pipeline.train import evaluate_checkpoint, train
from pipeline.training.local import train_local

AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_short_local_run_writes_complete_metrics(prepared, tmp_path, arch):
    cfg = tiny_config(prepared, tmp_path / arch, f"model.arch={arch}", "train.backend=local", *PRETRAINED)
    metrics = train_local(cfg)
    written = json.loads((tmp_path / arch / "metrics.json").read_text())
    assert written["steps"] == metrics["steps"] == 8
    iou_types = {"bbox", "segm"} if arch == "mask_rcnn" else {"bbox"}
    for who in ("teacher", "student"):
        assert set(written[who]) == iou_types
        for scores in written[who].values():
            assert AP_KEYS <= set(scores) and 0.0 <= scores["AP"] <= 100.0
    assert written["skipped_steps"] == 0
    assert written["pseudo_labeled_images"] == 4 * cfg.train.batch_size_unlabeled  # steps 5..8
    kept = sum(written["pseudo_label_class_counts"].values())
    assert written["pseudo_labels_per_image"] == pytest.approx(kept / written["pseudo_labeled_images"])
    assert set(written["pseudo_label_class_counts"]) == set(written["labeled_class_histogram"])
    assert sum(written["labeled_class_histogram"].values()) > 0
    assert (tmp_path / arch / "checkpoint.pt").exists()
    last = written["history"][-1]  # the evaluation interval's own pseudo-label figures, beside the APs
    assert last["pseudo_labels_per_image"] == pytest.approx(written["pseudo_labels_per_image"])
    figures = {"pseudo_label_precision", "pseudo_label_recall", "pseudo_label_wrong_class"}
    assert figures | {"teacher_AP", "student_AP"} <= set(last) and figures <= set(written)


@pytest.mark.slow
def test_checkpoint_round_trip_evaluate_and_resume(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "run", "train.backend=local", "train.steps=6")
    first = train_local(cfg)
    scores = evaluate_checkpoint(cfg, tmp_path / "run" / "checkpoint.pt", "teacher")
    assert scores["bbox"]["AP"] == pytest.approx(first["teacher"]["bbox"]["AP"])
    resumed = train_local(cfg.with_overrides({"train.steps": 8}))
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 8


@pytest.mark.slow
def test_unsup_weight_zero_is_the_supervised_baseline(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "sup", "train.backend=local", "ssl.unsup_loss_weight=0")
    assert train_local(cfg)["steps"] == 8


@pytest.mark.slow
def test_cli_train_prints_run_dir_last_and_evaluate_prints_json(prepared, tmp_path):
    out = tmp_path / "cli"
    common = [
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *sets(f"data.prepared={prepared}", "model.min_size=[128]", "model.rois_per_image=32"),
        *sets("data.eval_images=4", "tracking.enabled=false"),
    ]
    done = cli(
        "train", *common, *sets("train.backend=local", "train.steps=3", "ssl.burn_in_steps=2"), "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out.resolve())
    evaluated = cli("evaluate", *common, "--checkpoint", str(out / "checkpoint.pt"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "AP50" in json.loads(evaluated.stdout)["bbox"]


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_mask_rcnn_refuses_a_set_without_segmentations(tmp_path, backend):
    coco = tmp_path / "coco"
    generate(coco, 30, seed=1)  # boxes only
    prepared = tmp_path / "prepared"
    prepare_split(coco, 50, prepared)
    cfg = tiny_config(prepared, tmp_path / "run", "model.arch=mask_rcnn", f"train.backend={backend}")
    with pytest.raises(InputError, match="have no segmentation; model.arch=mask_rcnn"):
        train(cfg)


def test_console_log_keeps_unsupervised_losses_and_ap(capsys):
    print_sink(
        10,
        {
            "sup/loss_classifier": 0.5,
            "unsup/loss_objectness": 0.25,
            "teacher/bbox/AP": 12.0,
            "teacher/bbox/APs": 1.0,
            "pseudo_share/circle": 0.9,
            "lr": 0.01,
        },
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "step": 10,
        "sup/loss_classifier": 0.5,
        "unsup/loss_objectness": 0.25,
        "teacher/bbox/AP": 12.0,
        "lr": 0.01,
    }
