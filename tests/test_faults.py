"""Faults as users meet them, injected into a real `ssod train` on Ray: a labeler actor and a train worker
killed by PID with SIGKILL mid-run on a pool with a damaged shard, and the driver stopped with SIGTERM then
run again."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from badinput import assert_one_line_error, copy_prepared, damage_row_group, first_shard
from conftest import ROOT, tiny_config

from pipeline.config import dump_config
from pipeline.distributed.driver import _latest_checkpoint
from pipeline.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow  # three Ray runs

COUNTS = ("worker_restarts", "resumed_from_step", "labeler_restarts", "pseudo_rows_lost", "gate_timeouts")
STEP_LINE = re.compile(r'\{"step": (\d+)')
FAULT_RUN = [
    "train.backend=ray",
    "train.steps=20",
    "ssl.burn_in_steps=4",
    "train.checkpoint_period=6",
    "train.eval_period=20",
    "train.log_period=1",
    "ray.max_failures=1",
]


def _process_tree(root: int) -> dict[int, str]:
    """The processes below `root` (a run's own local Ray: raylet, GCS, workers) and their command lines."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                try:
                    tree[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(child)
    return tree


class Run:
    """`ssod train` in a subprocess; its console lines are read as they come."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the driver relays the workers' lines as they come
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        """Block until the console shows student step >= `step`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.output[-40:])
                continue
            seen = STEP_LINE.search(line)  # rank 0's console line, relayed with a "(RayTrainWorker pid=..)" prefix
            if seen and int(seen.group(1)) >= step:
                return
        raise AssertionError(f"no step {step} in {timeout} s:\n" + "".join(self.output[-40:]))

    def wait_for_checkpoint(self, run_dir: Path, min_step: int = 1, timeout: float = 600) -> None:
        """Block until Ray Train has registered a checkpoint of this run at step >= `min_step` (what a restart
        or a new `ssod train` resumes from)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.output[-40:])
            found = [_latest_checkpoint(experiment) for experiment in (run_dir / "ray").glob("ssod-*")]
            if any(path and load_checkpoint(path)["step"] >= min_step for path in found):
                return
            time.sleep(0.5)
        raise AssertionError(f"no checkpoint in {timeout} s:\n" + "".join(self.output[-40:]))

    def kill(self, title: str) -> None:
        pids = [pid for pid, cmd in _process_tree(self.proc.pid).items() if cmd.startswith("ray::") and title in cmd]
        assert pids, f"no {title} process below the driver"
        os.kill(pids[0], signal.SIGKILL)

    def finish(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def runs():
    """Every run a test starts; one still going when the test ends (a failed assertion) is killed with its Ray."""
    started: list[Run] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            for pid in [*_process_tree(run.proc.pid), run.proc.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _config(prepared: Path, tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "run.yaml"
    dump_config(tiny_config(prepared, tmp_path / "run", *FAULT_RUN, *overrides), path)
    return path


def test_a_killed_labeler_a_killed_train_worker_and_a_damaged_shard_are_survived_and_counted(prepared, tmp_path, runs):
    damaged = copy_prepared(prepared, tmp_path / "p")
    shard = first_shard(damaged / "unlabeled")
    damage_row_group(shard)  # found by the Ray Data reader, not the preflight (it reads footers only)
    config = _config(damaged, tmp_path)
    run = Run(config)
    runs.append(run)
    run.wait_for_step(7)  # mutual learning: the labeler is streaming
    run.kill("TeacherLabeler")
    run.wait_for_checkpoint(tmp_path / "run", min_step=12)  # registered: the console line alone may come first
    run.kill("RayTrainWorker")
    killed = time.monotonic()
    assert run.finish() == 0, "".join(run.output[-60:])
    finished = time.monotonic() - killed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(
        f"fault metrics: the run ended {finished:.0f} s after the worker was killed",
        {k: metrics[k] for k in (*COUNTS, "pseudo_wait_seconds")},
    )
    assert metrics["steps"] == 20 and metrics["stop_reason"] is None and metrics["pseudo_labeled_images"] > 0
    # The kill lands once Ray has registered step 12's checkpoint (or step 18's, if the worker got that far):
    # the restore is from the latest of them.
    assert metrics["worker_restarts"] == 1 and metrics["resumed_from_step"] in (12, 18)
    assert metrics["labeler_restarts"] >= 1
    assert metrics["pseudo_rows_lost"] == 0  # Ray Data retried the dead labeler's batch on its restart
    assert metrics["gate_timeouts"] == 0, "the labelers waited out the credit gate after the restart"
    assert metrics["corrupt_rows_skipped"] == pq.ParquetFile(shard).metadata.row_group(0).num_rows
    assert metrics["corrupt_parts_skipped"] == ["unlabeled/part-00000.parquet row group 0"]

    # The same run directory resumed as Mask R-CNN: refused on the driver, before Ray starts, in one line.
    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), "--set", "model.arch=mask_rcnn"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(refused, ".pt: its student does not fit this config (another model.arch")


def test_a_stopped_driver_exits_cleanly_and_the_same_command_resumes(prepared, tmp_path, runs):
    config = _config(prepared, tmp_path, "train.steps=16")
    run = Run(config)
    runs.append(run)
    run.wait_for_checkpoint(tmp_path / "run")  # step 6's: the console line alone may come before Ray has it
    ray_processes = _process_tree(run.proc.pid)
    stopped = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 130, "".join(run.output[-40:])
    print(f"driver exit after SIGTERM: {time.monotonic() - stopped:.1f} s")
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in ray_processes if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive, [ray_processes[pid][:80] for pid in alive]
    resumed = Run(config)
    runs.append(resumed)
    assert resumed.finish() == 0, "".join(resumed.output[-60:])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6 and metrics["steps"] == 16
