"""A fresh autoscaling cluster: Ray's fake multi-node provider, a head with 0 CPUs, workers added on demand."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, tiny_config

from pipeline.config import dump_config

pytestmark = pytest.mark.slow  # a Ray head node, an autoscaler and the nodes it adds

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_CPUS = 6  # one node of these holds the tiny run's plan (5 CPUs), and nothing bigger


def _autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "fake",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # the provider's nodes would otherwise join port 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": WORKER_CPUS},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")},
        **{key: [] for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")},
        **{key: [] for key in ("head_start_ray_commands", "worker_start_ray_commands")},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def _kill_processes_under(temp_dir: str) -> None:
    """Every process of this cluster names its temp dir on its command line; nobody else's Ray is touched."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    import ray

    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="rayfake")  # short: socket paths
    address = f"{ray.util.get_node_ip_address()}:{port}"
    config = tmp_path_factory.mktemp("autoscaler") / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(_autoscaling_config(address)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"]
        + [f"--temp-dir={temp_dir}", f"--autoscaling-config={config}"],
        check=True,
        env=env,
        timeout=180,
        capture_output=True,
    )
    try:
        yield address
    finally:
        _kill_processes_under(temp_dir)


def _train(config: Path, address: str, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    sets = [arg for override in (f"ray.address={address}", *overrides) for arg in ("--set", override)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_run_waits_for_the_autoscaler_then_trains(autoscaling_cluster, prepared, tmp_path):
    config = tmp_path / "run.yaml"
    dump_config(
        tiny_config(prepared, tmp_path / "run", "train.backend=ray", "train.steps=5", "ssl.burn_in_steps=3"), config
    )
    started = time.monotonic()
    run = _train(config, autoscaling_cluster)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "the Ray cluster grew to 6 CPUs" in run.stderr, run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 5
    assert time.monotonic() - started < 900


def test_a_plan_the_autoscaler_never_provides_ends_in_one_line_after_the_timeout(
    autoscaling_cluster, prepared, tmp_path
):
    config = tmp_path / "big.yaml"
    # 8 CPUs: more than the one node the autoscaler may add
    dump_config(tiny_config(prepared, tmp_path / "big", "train.backend=ray", "ray.cpus_per_worker=5"), config)
    started = time.monotonic()
    run = _train(config, autoscaling_cluster, "ray.startup_timeout_s=5", timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert lines[-1].startswith("error: resource plan needs 8 CPUs and 0 GPUs; after 5 s (ray.startup_timeout_s)")
    assert "the autoscaler never added the rest" in lines[-1]
    assert time.monotonic() - started < 120
