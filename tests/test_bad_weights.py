"""What `ssod` refuses in a weights file or a checkpoint, and what a load reports.

A weights file that is no torch file, holds Python objects or fits too little of the model ends in one line
naming the file, its tensor counts and the first mismatch; a partial load on purpose is counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from badinput import error_of
from conftest import tiny_config

from models.builders import build_detector
from pipeline.config import load_config
from pipeline.data.readers import load_categories
from pipeline.preflight import check_model
from pipeline.train import train
from pipeline.training.local import train_local


@pytest.mark.parametrize(
    "name, problem",
    [
        ("text.pt", "not a torch weights file"),
        ("objects.pt", "holds Python objects"),
        ("truncated.pt", "not a torch weights file"),
        ("dir.pt", "a directory"),
    ],
    ids=["text_file", "pickled_objects", "truncated", "directory"],
)
def test_weights_file_error_is_one_line_without_unsafe_advice(bad_files, name, problem):
    message = error_of(train_local_build, bad_files / name)
    assert message.startswith(f"model.weights_path: {bad_files / name}: {problem}")
    assert "weights_only=False" not in message and "trust" not in message


def train_local_build(path: Path) -> None:
    from pipeline.training.setup import build_student_teacher

    cfg = load_config(None, [f"model.weights_path={path}"])
    build_student_teacher(cfg, 3, torch.device("cpu"))


def test_resume_with_a_checkpoint_of_another_architecture(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "run", "train.backend=local")
    (tmp_path / "run").mkdir()
    other = build_detector(len(load_categories(prepared)), arch="mask_rcnn", backbone="tiny").state_dict()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    torch.save({"student": other, "teacher": other, "step": 4}, checkpoint)
    local = error_of(train_local, cfg)
    assert local.startswith(f"{checkpoint}: its student does not fit this config")
    # A Ray run checks the checkpoint it would resume from on the driver, with the same words.
    assert error_of(check_model, cfg, len(load_categories(prepared)), checkpoint) == local


def _tiny_state() -> dict:
    return build_detector(3, backbone="tiny", min_size=(96,)).state_dict()


def test_a_weights_file_that_fits_one_tensor_is_refused_with_its_counts(tmp_path):
    state = _tiny_state()
    total = sum(1 for k in state if not k.endswith("num_batches_tracked"))
    first = next(k for k in state if k.startswith("backbone."))
    path = tmp_path / "one.pt"
    torch.save({first: state[first], "head.extra": torch.zeros(2)}, path)
    message = error_of(train_local_build, path)
    assert message.startswith(
        f"model.weights_path: {path}: 1 of {total} detector tensors matched "
        f"({total - 1} missing, 1 unexpected, 0 shape-mismatched); first missing: "
    )
    assert message.endswith("; set model.allow_partial_weights=true to load it anyway")


def test_a_partial_load_on_purpose_is_taken_and_counted(tmp_path, capsys):
    from models.weights_report import LOADS

    state = _tiny_state()
    keep = {k: v for k, v in list(state.items())[:5]}
    path = tmp_path / "five.pt"
    torch.save(keep, path)
    LOADS.clear()
    cfg = load_config(None, [f"model.weights_path={path}", "model.allow_partial_weights=true"])
    from pipeline.training.setup import build_student_teacher

    student, _ = build_student_teacher(cfg, 3, torch.device("cpu"))
    [report] = LOADS
    assert report["matched"] == 5 and report["missing"] == report["model_tensors"] - 5 and report["unexpected"] == 0
    assert torch.equal(student.state_dict()[next(iter(keep))], next(iter(keep.values())))
    assert f"weights {path}: 5 of {report['model_tensors']} detector tensors matched" in capsys.readouterr().err


def test_a_weights_file_for_other_classes_names_the_mismatch(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(build_detector(5, backbone="tiny", min_size=(96,)).state_dict(), path)
    message = error_of(train_local_build, path)  # train_local_build: 3 classes
    assert "shape-mismatched); shape mismatch at roi_heads.box_predictor.cls_score.weight: file (6, " in message


def test_evaluate_and_label_count_what_they_load_and_refuse_a_poor_fit(prepared, tmp_path):
    from pipeline.labeling.model import checked_state
    from pipeline.train import evaluate_checkpoint

    cfg = tiny_config(prepared, tmp_path / "run", "data.eval_images=1")
    classes = len(load_categories(prepared))
    full = build_detector(classes, backbone="tiny", min_size=(128,)).state_dict()
    few = dict(list(full.items())[:3])
    checkpoint = tmp_path / "few.pt"
    torch.save({"student": full, "teacher": few, "step": 1}, checkpoint)
    message = error_of(evaluate_checkpoint, cfg, checkpoint, "teacher")
    assert message.startswith(f"{checkpoint} (teacher): 3 of ")
    scores = evaluate_checkpoint(cfg, checkpoint, "student")
    [report] = scores["weights_load"]
    assert report["matched"] == report["model_tensors"] and report["target"] == "student"
    assert error_of(checked_state, cfg, classes, few, "labels", "teacher").startswith("labels: 3 of ")
    state, report = checked_state(cfg, classes, full, "labels", "teacher")
    assert report["fraction"] == 1.0 and state.keys() == full.keys()


@pytest.mark.slow
def test_a_run_records_its_weights_load_in_metrics_json(prepared, tmp_path):
    classes = len(load_categories(prepared))
    path = tmp_path / "w.pt"
    torch.save(build_detector(classes, backbone="tiny", min_size=(128,)).state_dict(), path)
    cfg = tiny_config(
        prepared,
        tmp_path / "run",
        "train.backend=local",
        "train.steps=1",
        "ssl.burn_in_steps=1",
        "data.eval_images=1",
        f"model.weights_path={path}",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    [load] = metrics["weights_load"]
    assert load["source"] == str(path) and load["matched"] == load["model_tensors"] and load["missing"] == 0
