"""The distributed runner's driver: Ray Data labeler actors feed a Ray Train DDP student (the worker loop
is `pipeline/ray_worker.py`); rank 0 keeps the EMA teacher and publishes it to the weight store.

Staleness (student step minus the step of the teacher that labelled a row) is bounded by design:
input blocks of one labeler batch, one task in flight per labeler actor, one prefetched batch in the
trainer, so little is queued between labelers and trainer; rows older than `ssl.max_staleness` are
dropped and counted, never waited for, so the bound cannot deadlock.
"""
from __future__ import annotations

import contextlib
import json
import math
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.data import ActorPoolStrategy, ExecutionOptions, ExecutionResources

from pipeline.config import Config
from pipeline.data import require_segmentations
from pipeline.errors import InputError
from pipeline.labeler import TeacherLabeler, add_strong_views, labeled_views
from pipeline.ray_worker import LABELED, UNLABELED, train_loop_per_worker
from pipeline.readers import load_categories, load_split, read_image_folder, read_prepared
from pipeline.resources import VIEW_TASK_CPUS, ResourcePlan, data_context, plan_resources, start_ray
from pipeline.session import write_metrics
from pipeline.weights import get_or_create_store, store_name

MAX_LABELED_PASSES = 64  # beyond this a long run re-executes the labeled stream per 64 passes


# -- driver side ---------------------------------------------------------------------------------------
def _unlabeled_passes(cfg: Config, pool_size: int) -> int:
    """Passes over the pool so no worker runs dry (a ragged epoch boundary would stall DDP)."""
    rows_needed = max(cfg.train.steps - cfg.ssl.burn_in_steps, 0) * cfg.train.batch_size_unlabeled * cfg.ray.num_workers
    return math.ceil(1.5 * rows_needed / max(pool_size, 1)) + 1


def _labeled_passes(cfg: Config, num_labeled: int) -> int:
    """Passes over the labeled set in one execution (at most MAX_LABELED_PASSES).

    Each new execution asks Ray Data's autoscaling coordinator for CPUs afresh; while the unlabeled
    stream ran, a second labeled epoch was granted none ("1/0 CPU") and mutual learning stalled.
    """
    rows_needed = cfg.train.steps * cfg.train.batch_size_labeled * cfg.ray.num_workers
    return min(math.ceil(rows_needed / max(num_labeled, 1)) + 1, MAX_LABELED_PASSES)


def _passes(dataset: ray.data.Dataset, n: int) -> ray.data.Dataset:
    """`n` passes over `dataset` as one streaming execution."""
    return dataset.union(*[dataset] * (n - 1)) if n > 1 else dataset


def build_datasets(cfg: Config, num_classes: int, weights_store: str) -> dict[str, ray.data.Dataset]:
    split, r = load_split(cfg.data.prepared), cfg.ray
    pool_size = split["num_unlabeled"]
    if split["num_labeled"] < r.num_workers:
        raise InputError(f"{split['num_labeled']} labeled images cannot be split over ray.num_workers={r.num_workers}")
    labeled = _passes(read_prepared(cfg.data.prepared, LABELED), _labeled_passes(cfg, split["num_labeled"])).map_batches(
        labeled_views, batch_size=cfg.train.batch_size_labeled, num_cpus=VIEW_TASK_CPUS,
        fn_kwargs={"with_masks": cfg.model.arch == "mask_rcnn", "flip_prob": cfg.data.flip_prob},
    )
    with _block_size(_labeler_batch_bytes(cfg, pool_size)):
        unlabeled = _unlabeled_stream(cfg, num_classes, weights_store, pool_size)
    return {LABELED: labeled, UNLABELED: unlabeled}


def _block_size(max_bytes: int) -> contextlib.AbstractContextManager:
    """Datasets built inside get blocks of about `max_bytes`.

    Ray Data backpressures in blocks, so block size is the staleness knob: a read block of the whole
    shard (Parquet V2 ignores `override_num_blocks`) would be labelled in one task whose output only
    appears at its end, while the credit gate holds the labeler back.
    """
    return data_context(target_max_block_size=max_bytes)


def _labeler_batch_bytes(cfg: Config, pool_size: int) -> int:
    """Encoded bytes of one labeler batch, from the shards' size on disk."""
    files = list((Path(cfg.data.prepared) / UNLABELED).glob("*.parquet"))
    per_row = sum(f.stat().st_size for f in files) / max(pool_size, 1)
    return max(int(per_row * cfg.ray.labeler_batch_size), 1024)


def _unlabeled_stream(cfg: Config, num_classes: int, weights_store: str, pool_size: int) -> ray.data.Dataset:
    r = cfg.ray
    pool = read_prepared(cfg.data.prepared, UNLABELED)
    if cfg.data.unlabeled_folder:
        extra = read_image_folder(cfg.data.unlabeled_folder)
        pool, pool_size = pool.union(extra), pool_size + extra.count()
    return _passes(pool, _unlabeled_passes(cfg, pool_size)).map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={"config": cfg.model_dump(), "num_classes": num_classes, "store_name": weights_store},
        compute=ActorPoolStrategy(size=r.num_labelers, max_tasks_in_flight_per_actor=1),
        batch_size=r.labeler_batch_size, num_cpus=r.cpus_per_labeler, num_gpus=r.gpus_per_labeler,
    ).map_batches(add_strong_views, batch_size=r.labeler_batch_size, num_cpus=VIEW_TASK_CPUS)


def _data_config(plan: ResourcePlan) -> ray.train.DataConfig:
    """A budget per stream: with one shared limit the labeled stream reserved it all (see resources.py)."""
    def options(cpus: float) -> ExecutionOptions:
        return ExecutionOptions(resource_limits=ExecutionResources(cpu=cpus, object_store_memory=512 * 1024**2))

    return ray.train.DataConfig(execution_options={LABELED: options(plan.labeled_budget_cpus),
                                                   UNLABELED: options(plan.unlabeled_budget_cpus)})


def train_ray(cfg: Config, callbacks: list | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Plan resources, start or join Ray, fit the TorchTrainer, write metrics.json on the driver."""
    cfg = cfg.with_absolute_paths()
    if cfg.model.arch == "mask_rcnn":
        require_segmentations(cfg.data.prepared)
    plan = plan_resources(cfg)
    start_ray(cfg, plan)
    run_dir = Path(cfg.train.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = _run_id(run_dir)
    store = get_or_create_store(store_name(run_id))
    num_classes = len(load_categories(cfg.data.prepared))
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "run_dir": str(run_dir), "store": store_name(run_id),
                           "parent_run_id": parent_run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, "GPU": cfg.ray.gpus_per_worker},
        ),
        datasets=build_datasets(cfg, num_classes, store_name(run_id)),
        dataset_config=_data_config(plan),
        run_config=ray.train.RunConfig(
            name=f"ssod-{run_id}", storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    try:
        result = trainer.fit()
    finally:
        ray.kill(store)
    metrics = json.loads(result.metrics["metrics_json"])
    write_metrics(run_dir, metrics)
    return metrics


def _run_id(run_dir: Path) -> str:
    """Stable per run directory, so a second `ssod train` into it resumes the same Ray Train run."""
    id_file = run_dir / "ray_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
