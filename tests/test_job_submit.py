"""`ray job submit --working-dir .` against a `ray start --head` cluster on this machine."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, sets

pytestmark = pytest.mark.slow  # a Ray head node and a submitted job

RAY = str(Path(sys.executable).with_name("ray"))


def test_job_submitted_to_a_head_node_trains_on_ray(prepared, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    gcs, dashboard = free_port(), free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=4",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={tempfile.mkdtemp(prefix='ray')}",
        ],  # short: socket paths
        check=True,
        env=env,
        timeout=180,
        capture_output=True,
    )
    out = tmp_path / "job_run"
    try:
        job = _submit(
            [
                RAY,
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard}",
                "--working-dir",
                ".",
                "--",
                "python",
                "-m",
                "pipeline.cli",
                "train",
                "--config",
                "configs/demo.yaml",
                *sets(
                    f"data.prepared={prepared}",
                    "train.steps=5",
                    "ssl.burn_in_steps=3",
                    "model.backbone=tiny",
                    "model.pretrained=none",  # the submission is tested, not the model
                    "model.min_size=[128]",
                    "model.rois_per_image=32",
                    "data.eval_images=4",
                    "ray.cpus_per_worker=0.5",
                    "ray.cpus_per_labeler=0.25",
                    "ssl.max_staleness=8",
                    "tracking.enabled=false",
                ),
                "--output",
                str(out),
            ],
            env,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        assert (out / "metrics.json").exists()
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120, capture_output=True)


def _submit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting (Ray answers "No available
    agent to submit job, please try again later", seen on a loaded 2-core machine)."""
    for _ in range(6):
        job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stdout + job.stderr:
            return job
        time.sleep(10)
    return job
