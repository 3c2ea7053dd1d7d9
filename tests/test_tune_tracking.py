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


def _space_config(space: dict, *overrides: str):
    from pipeline.config import load_config

    return load_config(None, ["train.steps=3000", f"tune.space={json.dumps(space)}", *overrides])


REFUSED_SPACES = {  # case -> (space, the one line)
    "uniform_over_an_integer_key": (
        {"ssl.burn_in_steps": {"type": "uniform", "low": 500, "high": 2000}},
        "tune.space.ssl.burn_in_steps: an integer key: uniform draws fractions (e.g. 1055); use randint or choice",
    ),
    "loguniform_over_an_integer_key": (
        {"ssl.teacher_update_interval": {"type": "loguniform", "low": 1, "high": 8}},
        "tune.space.ssl.teacher_update_interval: an integer key: loguniform draws fractions",
    ),
    "randint_with_a_fractional_bound": (
        {"ssl.burn_in_steps": {"type": "randint", "low": 10.5, "high": 100}},
        "tune.space.ssl.burn_in_steps: randint needs whole-number bounds (got 10.5, 100)",
    ),
    "randint_over_a_bool_key": (
        {"ssl.unsup_mask_loss": {"type": "randint", "low": 0, "high": 2}},
        "tune.space.ssl.unsup_mask_loss: a randint dimension draws numbers; this key takes bool: use choice",
    ),
    "loguniform_from_zero": (
        {"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}},
        "tune.space.train.lr: loguniform needs low > 0 (got 0)",
    ),
    "a_fraction_among_integer_choices": (
        {"ssl.burn_in_steps": {"type": "choice", "values": [500, 1000.5]}},
        "tune.space.ssl.burn_in_steps: the value 1000.5 makes an invalid config: Input should be a valid integer",
    ),
    "a_bool_among_integer_choices": (
        {"ssl.burn_in_steps": {"type": "choice", "values": [500, True]}},
        "tune.space.ssl.burn_in_steps: the value True makes an invalid config: Input should be a valid integer",
    ),
    "a_range_that_leaves_the_keys_range": (
        {"train.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}},
        "tune.space.train.momentum: the value 1.0 makes an invalid config: Input should be less than 1",
    ),
    "a_randint_past_another_key": (
        {"ssl.burn_in_steps": {"type": "randint", "low": 100, "high": 4000}},
        "tune.space.ssl.burn_in_steps: the value 3212 makes an invalid config: ssl.burn_in_steps (3212) exceeds",
    ),
}


@pytest.mark.parametrize("space, line", REFUSED_SPACES.values(), ids=REFUSED_SPACES.keys())
def test_a_dimension_is_typed_by_its_key_and_checked_over_its_range(space, line):
    from badinput import error_of

    from tune.space import check_space

    assert error_of(check_space, _space_config(space)).startswith(line)


def test_dimensions_that_fit_their_keys_pass():
    from tune.space import check_space, probe_values

    cfg = _space_config(
        {
            "ssl.burn_in_steps": {"type": "randint", "low": 100, "high": 3001},  # high is exclusive
            "train.lr": {"type": "randint", "low": 1, "high": 3},  # a float key takes whole numbers
            "train.momentum": {"type": "uniform", "low": 0.5, "high": 1.0},  # 1.0 itself is never drawn
            "ssl.score_threshold": {"type": "choice", "values": [0.5, "auto"]},
        }
    )
    check_space(cfg)
    assert all(isinstance(v, int) for v in probe_values(cfg.tune.space["ssl.burn_in_steps"]))


class _Result:
    def __init__(self, metrics=None, error=None, **config):
        self.metrics, self.error, self.config = metrics or {}, error, config


def test_a_failed_trial_is_failed_in_the_summary_and_never_the_best():
    from pipeline.errors import InputError
    from tune.driver import summarize

    failed = _Result({"teacher_AP": 99.0}, RuntimeError("Traceback ...\nValueError: boom"), **{"train.lr": 0.5})
    results = [
        failed,
        _Result({"teacher_AP": 3.0}, **{"train.lr": 0.01}),
        _Result({"teacher_AP": float("nan")}, **{"train.lr": 0.02}),
        _Result({}, InputError("tune.space: train.lr: bad"), **{"train.lr": 0.03}),
    ]
    summary = summarize(results, "teacher_AP", "max", ["train.lr"])
    assert summary["best"] == {"train.lr": 0.01} and summary["best_metric"] == 3.0
    assert summary["trials"] == 4 and summary["errors"] == 2 and summary["completed"] == 2
    assert summary["failures"] == ["ValueError: boom", "tune.space: train.lr: bad"]
    only_failed = summarize([failed], "teacher_AP", "max", ["train.lr"])  # Tune's own pick: the only trial
    assert only_failed["best"] is None and only_failed["errors"] == 1


def test_a_search_whose_trials_all_failed_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import tune.driver as driver
    from pipeline.cli import main

    class Tuner:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return [_Result(error=RuntimeError("worker died\nRuntimeError: CUDA out of memory"))] * 2

    monkeypatch.setattr(driver, "start_ray", lambda *args: None)
    monkeypatch.setattr(driver.tune, "Tuner", Tuner)
    argv = ["tune", "--set", "tracking.enabled=false", "--samples", "2", "--output", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --output {tmp_path / 's'}: no trial of 2 has a result, 2 failed "
        "(first failure: RuntimeError: CUDA out of memory); see summary.json\n"
    )
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["errors"] == 2 and summary["best"] is None and summary["best_config"] is None
