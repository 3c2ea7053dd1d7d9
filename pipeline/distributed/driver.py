"""The distributed runner's driver: Ray Data labeler actors (`pipeline/distributed/streams.py`) feed a Ray Train DDP
student (the worker loop is `pipeline/distributed/worker.py`); rank 0 keeps the EMA teacher and publishes it to the
weight store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from pipeline.config import Config
from pipeline.distributed.cluster import start_ray
from pipeline.distributed.resources import plan_resources
from pipeline.distributed.streams import build_datasets, data_config
from pipeline.distributed.weights import get_or_create_store, store_name
from pipeline.distributed.worker import train_loop_per_worker
from pipeline.errors import InputError, find_input_error
from pipeline.preflight import check_model, check_run
from pipeline.training.checkpoints import CHECKPOINT_NAME, write_metrics


def train_ray(cfg: Config, callbacks: list | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train on Ray: check the inputs, plan resources, start or join Ray, fit the TorchTrainer (labeler actors
    feed DDP train workers), and write metrics.json on the driver. A second call with the same
    `train.output_dir` resumes Ray Train's run from its last checkpoint.

    Args:
        cfg: the validated config (`train.backend` is not read here; `ray.*` sizes the run).
        callbacks: Ray Train callbacks for the run (Tune passes its own).
        parent_run_id: the MLflow run to nest this run's tracking under (a Tune search's).

    Returns:
        metrics.json's content, as rank 0 wrote it; `stop_reason` is not None when the run ended early.
    """
    inputs = check_run(cfg)  # before the paths become absolute: the same message as the local runner's
    cfg = cfg.with_absolute_paths()
    run_dir = Path(cfg.train.output_dir)
    run_id = _run_id(run_dir)
    check_model(cfg, inputs.num_classes, _latest_checkpoint(run_dir / "ray" / f"ssod-{run_id}"))
    plan = plan_resources(cfg)
    start_ray(cfg, plan)
    store = get_or_create_store(store_name(run_id))
    for part, rows in inputs.skipped.parts.items():  # the store counts what the readers skip from here on
        store.skip.remote(part, rows, "found by the preflight")
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "run_dir": str(run_dir),
            "store": store_name(run_id),
            "parent_run_id": parent_run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, "GPU": cfg.ray.gpus_per_worker},
        ),
        datasets=build_datasets(cfg, inputs, store_name(run_id)),
        dataset_config=data_config(plan),
        run_config=ray.train.RunConfig(
            name=f"ssod-{run_id}",
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    try:
        with _sigterm_aborts_the_run():
            result = trainer.fit()
    except Exception as exc:  # an InputError in a worker arrives wrapped in Ray's errors: say it in one line
        cause = find_input_error(exc)
        if cause is None:
            raise
        raise InputError(str(cause)) from None
    finally:
        ray.kill(store)
    metrics = json.loads(result.metrics["metrics_json"])
    write_metrics(run_dir, metrics)
    return metrics


@contextlib.contextmanager
def _sigterm_aborts_the_run() -> Iterator[None]:
    """SIGTERM stops the run the way Ctrl-C does: Ray Train's own SIGINT handler (set while `fit` runs) aborts
    the worker group, then the CLI exits 130. (`ray.init` replaces the SIGTERM handler with a bare exit, which
    would take the driver down mid-call: SIGABRT.)"""
    if threading.current_thread() is not threading.main_thread():  # under Tune: its own handling
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        try:
            abort = signal.getsignal(signal.SIGINT)
            if callable(abort):
                abort(signal.SIGINT, frame)
        finally:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _latest_checkpoint(experiment: Path) -> Path | None:
    """The checkpoint Ray Train would resume this run from, if any."""
    if not experiment.is_dir():
        return None
    logging.disable(logging.INFO)  # Ray logs finding the snapshot; a refusal that follows must stay one line
    try:
        checkpoint = ray.train.Result.from_path(str(experiment)).checkpoint
    except Exception:  # unreadable run state: Ray decides on resuming, the worker checks the fit
        return None
    finally:
        logging.disable(logging.NOTSET)
    return Path(checkpoint.path) / CHECKPOINT_NAME if checkpoint else None


def _run_id(run_dir: Path) -> str:
    """Stable per run directory, so a second `ssod train` into it resumes the same Ray Train run."""
    id_file = run_dir / "ray_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
