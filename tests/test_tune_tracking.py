"""MLflow tracking read back from real stores, and a real 2-trial Ray Tune search."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import torch
from conftest import ROOT, cli, free_port, sets, tiny_config
from mlflow.tracking import MlflowClient

from pipeline.training.local import train_local
from tune.driver import run_search


@pytest.mark.slow
def test_a_tracked_run_has_params_histories_pictures_and_a_registered_teacher(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts beside the working directory
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(
        prepared,
        tmp_path / "run",
        "train.backend=local",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.registered_model_name=ssod-test-teacher",
        "train.steps=8",
    )
    train_local(cfg)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.params["ssl.score_threshold"] == "0.05" and run.data.params["model.backbone"] == "tiny"
    run_id = run.info.run_id
    assert len(client.get_metric_history(run_id, "sup/loss_classifier")) == 4  # every log_period=2 steps
    assert len(client.get_metric_history(run_id, "unsup/loss_classifier")) >= 1
    assert [m.step for m in client.get_metric_history(run_id, "teacher/bbox/AP")] == [4, 8]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"config.yaml", "split.json", "metrics.json", "plots/per_class_ap_bbox.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "pseudo_labels")] == ["pseudo_labels/step_000008.png"]
    model = mlflow.pytorch.load_model("models:/ssod-test-teacher/1").eval()
    with torch.inference_mode():
        [out] = model([torch.rand(3, 128, 128)])
    assert set(out) >= {"boxes", "labels", "scores"}


@pytest.mark.slow
def test_two_trial_search_nests_runs_and_writes_a_trainable_best_config(ray_cluster, prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(
        prepared,
        tmp_path / "unused",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.registered_model_name=null",
        "train.steps=6",
        "ssl.burn_in_steps=2",
        "train.eval_period=3",
        "train.checkpoint_period=3",
        "ray.cpus_per_worker=0.5",
        "ray.cpus_per_labeler=0.25",
        "ssl.max_staleness=4",
        'tune.space={"ssl.unsup_loss_weight": {"type": "uniform", "low": 1.0, "high": 3.0},'
        ' "ssl.score_threshold": {"type": "choice", "values": [0.05, 0.1]}}',
    )
    summary = run_search(cfg, samples=2, max_concurrent=1, output=tmp_path / "search")
    assert summary["trials"] == 2 and summary["errors"] == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("ssod.search") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("teacher/bbox/AP" in r.data.metrics for r in children)
    best = tmp_path / "search" / "best_config.yaml"
    from_best = sets("train.backend=local", "train.steps=2", "tracking.enabled=false")
    done = cli("train", "--config", str(best), *from_best, "--output", str(tmp_path / "from_best"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "from_best" / "metrics.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_training_against_an_mlflow_server_is_found_through_the_rest_api(prepared, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(1)
        overrides = sets(
            f"data.prepared={prepared}",
            "train.backend=local",
            "train.steps=3",
            "ssl.burn_in_steps=2",
            "model.min_size=[128]",
            "data.eval_images=4",
            "tracking.registered_model_name=null",
            "tracking.experiment=server-test",
        )
        done = cli(
            "train",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            *overrides,
            "--output",
            str(tmp_path / "run"),
            env={**os.environ, "MLFLOW_TRACKING_URI": base},
        )
        assert done.returncode == 0, done.stderr
        query = json.dumps({"experiment_ids": [_experiment_id(base, "server-test")]}).encode()
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", data=query, headers={"Content-Type": "application/json"}
        )
        runs = json.loads(urllib.request.urlopen(request, timeout=10).read())["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        assert any(m["key"] == "teacher/bbox/AP" for m in runs[0]["data"]["metrics"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def _experiment_id(base: str, name: str) -> str:
    url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())["experiment"]["experiment_id"]
