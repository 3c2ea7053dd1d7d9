"""MLflow tracking against a real sqlite store in a temp dir, read back with MlflowClient."""

import json
import math
import socket
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from conftest import free_port
from mlflow.tracking import MlflowClient

from models.builders import build_detector
from pipeline.config import Config
from pipeline.tracking import plots, ui
from pipeline.tracking.tracker import Tracker, tracking_uri
from pipeline.tracking.ui import runs_url, serve_ui

NAMES = {1: "cat", 2: "dog", 3: "bird"}
MODEL_NAME = "ssod-teacher-test"


def _config(tmp: Path, uri: str | None) -> Config:
    prepared = tmp / "prepared"
    prepared.mkdir(exist_ok=True)
    (prepared / "split.json").write_text(json.dumps({"percent": 1.0, "seed": 2, "labeled": [1, 2], "unlabeled": [3]}))
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.registered_model_name = MODEL_NAME
    cfg.data.prepared = str(prepared)
    return cfg


def _pseudo_labels() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 5:30, 5:40], masks[1, 35:60, 40:75] = 1, 1
    full = {
        "boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [40.0, 35.0, 75.0, 60.0]]),
        "labels": torch.tensor([1, 3]),
        "scores": torch.tensor([0.91, 0.78]),
        "masks": masks,
    }
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return [torch.rand(3, 64, 80), torch.rand(3, 48, 48)], [full, empty]


def _final_metrics() -> dict:
    def ap(base: float) -> dict:
        per_class = {"cat": base, "dog": None, "bird": 1.0}
        return {"bbox": {"AP": base, "AP50": base * 2, "APs": None, "per_class": per_class}}

    return {
        "teacher": ap(12.5),
        "student": ap(10.0),
        "steps": 30,
        "skipped_steps": 0,
        "pseudo_labels_per_image": 1.5,
        "pseudo_label_precision": None,
        "pseudo_label_class_counts": {"cat": 10, "dog": 0, "bird": 5},
        "labeled_class_histogram": {"cat": 4, "dog": 4, "bird": 2},
        "history": [{"step": 30, "teacher_AP": 12.5, "student_AP": 10.0}],
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One full run (start, metrics, pseudo-label grid, finish with a tiny teacher) in a temp store."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # a sqlite store keeps artifacts under ./mlruns
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_dir = tmp / "run"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("ssl:\n  score_threshold: 0.7\n")
        tracker = Tracker(_config(tmp, uri), run_dir, run_name="unit", tags={"purpose": "test"})
        run_id = tracker.start()
        for step in (10, 20, 30):
            tracker(step, {"loss/total": 1.0 / step, "lr": 0.01, "nan": math.nan, "none": None, "text": "x"})
        images, targets = _pseudo_labels()
        tracker.log_pseudo_label_grid(20, images, targets, NAMES)
        tracker.log_score_histograms(
            20, {"cat": [0.1, 0.2, 0.9], "dog": [0.4], "bird": []}, {"cat": 0.6, "dog": 0.5, "bird": 0.5}
        )
        torch.manual_seed(0)
        tracker.finish(_final_metrics(), build_detector(3, backbone="tiny", min_size=(96,)))
        assert tracker.run_id is None
        yield {"uri": uri, "tmp": tmp, "run_id": run_id, "client": MlflowClient(uri)}
        mlflow.set_tracking_uri(None)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri("sqlite:///cfg.db") == "sqlite:///cfg.db"
    assert tracking_uri(None) == "sqlite:///env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(None) == "sqlite:///mlflow.db"


def test_run_has_params_metrics_and_tags(store):
    run = store["client"].get_run(store["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    assert run.data.params["ssl.score_threshold"] == "0.7"
    assert run.data.params["model.min_size"] == "[288, 320, 352]"
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["run_dir"] == str((store["tmp"] / "run").resolve())
    history = store["client"].get_metric_history(store["run_id"], "loss/total")
    assert sorted((m.step, m.value) for m in history) == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert not {"nan", "none", "text"} & set(run.data.metrics)
    assert run.data.metrics["final/teacher/bbox/AP"] == 12.5
    assert run.data.metrics["final/student/bbox/AP50"] == 20.0
    assert run.data.metrics["final/steps"] == 30
    assert "final/teacher/bbox/APs" not in run.data.metrics
    experiment = store["client"].get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs


def test_run_names_its_split_as_a_dataset_and_the_ui_url_opens_its_runs(store):
    run = store["client"].get_run(store["run_id"])
    [split] = run.inputs.dataset_inputs
    assert split.dataset.name == "prepared (1 % labeled, seed 2)" and split.dataset.source_type == "local"
    assert {t.key: t.value for t in split.tags}["mlflow.data.context"] == "training"
    url = runs_url(store["uri"], Config().tracking.experiment, "127.0.0.1", 5000)
    assert url == f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs"
    assert runs_url(store["uri"], "no-such-experiment", "127.0.0.1", 5000) == "http://127.0.0.1:5000/"


def test_run_artifacts(store):
    client, run_id = store["client"], store["run_id"]
    artifacts = set(_artifacts(client, run_id))
    assert {
        "config.yaml",
        "split.json",
        "metrics.json",
        "pseudo_labels/step_000020.png",
        "score_histograms/step_000020.png",
        "plots/per_class_ap_bbox.png",
        "plots/pseudo_label_distribution.png",
    } <= artifacts
    local = Path(client.download_artifacts(run_id, "metrics.json", str(store["tmp"])))
    assert json.loads(local.read_text())["teacher"]["bbox"]["per_class"]["dog"] is None
    grid = mlflow.artifacts.load_image(f"runs:/{run_id}/pseudo_labels/step_000020.png")
    assert grid.size[0] > 80 and grid.size[1] >= 64


def test_teacher_is_registered_and_loads(store):
    client = store["client"]
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == store["run_id"]
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}/1")
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 96)])
    assert {"boxes", "labels", "scores"} <= set(out)
    assert out["boxes"].shape[-1] == 4


def test_nested_run_records_parent(store):
    client = store["client"]
    parent = client.create_run(client.get_run(store["run_id"]).info.experiment_id, run_name="sweep")
    cfg = _config(store["tmp"], store["uri"])
    child = Tracker(cfg, store["tmp"] / "trial", parent_run_id=parent.info.run_id)
    child_id = child.start()
    child.finish({"steps": 1}, None, status="KILLED")
    run = client.get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.status == "KILLED"
    assert mlflow.active_run() is None


def test_disabled_tracking_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, f"sqlite:///{tmp_path}/off.db")
    cfg.tracking.enabled = False
    tracker = Tracker(cfg, tmp_path / "run")
    assert tracker.start() is None
    tracker(1, {"loss": 1.0})
    tracker.log_artifact(tmp_path / "prepared" / "split.json")
    tracker.log_pseudo_label_grid(1, *_pseudo_labels(), NAMES)
    tracker.finish(_final_metrics(), torch.nn.Linear(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_pseudo_label_grid_draws_boxes_and_masks():
    images, targets = _pseudo_labels()
    images = [torch.zeros_like(i) for i in images]
    grid = plots.pseudo_label_grid(images, targets, NAMES)
    assert grid.dtype == np.uint8 and grid.shape == (64 + 4, 2 * 80 + 6, 3)  # cells padded to the largest image
    first = grid[2:66, 2:82]
    assert first[15, 20].any()  # inside the translucent mask
    assert not grid[2:66, 84:164].any()  # the empty image (and its padding) stays black


def test_serve_ui_runs_mlflow_ui_on_loopback(monkeypatch):
    seen = {}

    class FakePopen:
        stdout = None

        def __init__(self, command, **kwargs):
            seen["command"] = command

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(ui.subprocess, "Popen", FakePopen)
    assert serve_ui("sqlite:///x.db", port=free_port()) == 0
    command = seen["command"]
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:///x.db"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1].isdigit()


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--port", "99999"], "error: --port 99999: not a TCP port (1 to 65535)"),
        (["--port", "0"], "error: --port 0: not a TCP port (1 to 65535)"),
        (["--port", "http"], "error: argument --port: invalid int value: 'http'"),
        (["--host", "no-such-host.invalid"], "error: --host no-such-host.invalid: not a host name or address"),
    ],
    ids=["port_too_big", "port_zero", "port_not_a_number", "unknown_host"],
)
def test_ui_arguments_are_checked_before_the_server_starts(capsys, argv, line):
    from pipeline.cli import main

    assert main(["ui", "--set", "tracking.uri=sqlite:///never.db", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_ui_on_a_port_in_use_is_one_line(capsys):
    from pipeline.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--set", "tracking.uri=sqlite:///never.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port} (") and err.count("\n") == 1


def test_a_ui_server_that_fails_is_one_line_and_exit_2(capsys, monkeypatch):
    from pipeline.cli import main

    crash = "import sys; print('Traceback (most recent call last):'); print('  File x'); sys.exit('OSError: boom')"
    monkeypatch.setattr(ui, "ui_command", lambda uri, host, port: [sys.executable, "-c", crash])
    port = free_port()
    assert main(["ui", "--port", str(port), "--set", "tracking.uri=sqlite:///never.db"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: mlflow ui on 127.0.0.1:{port} (tracking.uri=sqlite:///never.db) exited with code 1: OSError: boom\n"
    )
