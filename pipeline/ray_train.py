"""The distributed runner: Ray Data labeler actors feed a Ray Train DDP student; rank 0 keeps the EMA
teacher and publishes it to the weight store every `ssl.sync_interval` steps.

Staleness (student step minus the step of the teacher that labelled a row) is bounded by design:
input blocks of one labeler batch, one task in flight per labeler actor, one prefetched batch in the
trainer, so little is queued between labelers and trainer; rows older than `ssl.max_staleness` are
dropped and counted, never waited for, so the bound cannot deadlock.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import ActorPoolStrategy, DataContext, ExecutionOptions, ExecutionResources

from models.unbiased_teacher import Batch
from pipeline.augment import to_float
from pipeline.config import Config
from pipeline.data import require_segmentations
from pipeline.errors import InputError
from pipeline.labeler import TeacherLabeler, add_strong_views, decode_masks, labeled_views
from pipeline.loop import TrainingRun, print_sink
from pipeline.readers import load_categories, load_split, read_image_folder, read_prepared
from pipeline.resources import VIEW_TASK_CPUS, ResourcePlan, plan_resources, start_ray
from pipeline.session import CHECKPOINT_NAME, write_metrics
from pipeline.weights import get_or_create_store, publish, store_name

LABELED, UNLABELED = "labeled", "unlabeled"
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


@contextlib.contextmanager
def _block_size(max_bytes: int) -> Iterator[None]:
    """Datasets built inside get blocks of about `max_bytes` (they copy the context when created).

    Ray Data backpressures in blocks, so block size is the staleness knob: a read block of the whole
    shard (Parquet V2 ignores `override_num_blocks`) would be labelled in one task whose output only
    appears at its end, while the credit gate holds the labeler back.
    """
    context = DataContext.get_current()
    previous, context.target_max_block_size = context.target_max_block_size, max_bytes
    try:
        yield
    finally:
        context.target_max_block_size = previous


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


# -- worker side ---------------------------------------------------------------------------------------
def _agree(flag: bool, device: torch.device, op=dist.ReduceOp.MIN) -> bool:
    """One decision for all ranks (all must stop, evaluate-stop or continue together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=op)
    return bool(value.item())


def _epochs(shard, batch_size: int) -> Iterator[dict]:
    """Endless labeled batches; shards are equal-sized, so every rank crosses epochs at the same step."""
    while True:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)


def _labeled_batch(batch: dict, with_masks: bool) -> Batch:
    images, targets = [], []
    for weak, strong, boxes, labels, masks in zip(batch["weak"], batch["strong"], batch["boxes"],
                                                  batch["labels"], batch["masks"]):
        target = {"boxes": torch.from_numpy(boxes.reshape(-1, 4)), "labels": torch.from_numpy(labels)}
        if with_masks:
            target["masks"] = decode_masks(list(masks), *weak.shape[1:])
        images += [to_float(torch.from_numpy(weak)), to_float(torch.from_numpy(strong))]
        targets += [target, target]
    return Batch(images, targets)


class FreshRows:
    """Pseudo-labelled rows within `max_staleness` of the current step; older ones are dropped, counted."""

    def __init__(self, shard, fetch_size: int, max_staleness: int):
        self.rows = (row for b in shard.iter_batches(batch_size=fetch_size, batch_format="numpy", prefetch_batches=1)
                     for row in _batch_rows(b))
        self.max_staleness, self.dropped = max_staleness, 0
        self.taken, self.label_seconds = 0, 0.0  # per-actor labelling time of the rows used
        self.wait_seconds = 0.0  # the trainer's time blocked on the stream
        self.versions: set[int] = set()
        self._reported = 0

    def pulled_since_last(self) -> int:
        """Rows taken or dropped since the last call: the credit handed back to the labelers."""
        pulled = self.taken + self.dropped
        delta, self._reported = pulled - self._reported, pulled
        return delta

    def take(self, n: int, step: int) -> list[dict] | None:
        started = time.perf_counter()
        try:
            return self._take(n, step)
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _take(self, n: int, step: int) -> list[dict] | None:
        out = []
        for row in self.rows:
            if step - int(row["teacher_version"]) > self.max_staleness:
                self.dropped += 1
                continue
            out.append(row)
            self.taken += 1
            self.versions.add(int(row["teacher_version"]))
            self.label_seconds += float(row["label_seconds"])
            if len(out) == n:
                return out
        return None  # the stream ran dry


def _batch_rows(batch: dict) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["image_id"]))]


def _pseudo_batch(run: TrainingRun, rows: list[dict]) -> Batch:
    images, targets = [], []
    for row in rows:
        image = torch.from_numpy(row["image"])
        target = {"boxes": torch.from_numpy(row["pl_boxes"].reshape(-1, 4)), "labels": torch.from_numpy(row["pl_labels"])}
        if run.with_masks:
            target["masks"] = decode_masks(list(row["pl_masks"]), *image.shape[1:])
        held_aside = None
        if row["annotated"]:
            held_aside = {"boxes": torch.from_numpy(row["gt_boxes"].reshape(-1, 4)),
                          "labels": torch.from_numpy(row["gt_labels"])}
        run.stats.add(target, held_aside)
        if run.rank == 0:  # rank 0 fits the thresholds it publishes
            run.observe_scores([{"labels": torch.from_numpy(row["teacher_labels"]),
                                 "scores": torch.from_numpy(row["teacher_scores"])}])
        run.stats.add_staleness(run.step - int(row["teacher_version"]))
        images.append(to_float(image))
        targets.append(target)
    return Batch(images, targets)


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, device = ctx.get_world_rank(), ray.train.torch.get_device()
    run = TrainingRun(cfg, config["run_dir"], rank=rank, device=device, parent_run_id=config.get("parent_run_id"),
                      sinks=[print_sink] if rank == 0 else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            run.restore(Path(directory) / CHECKPOINT_NAME)
    # Two forward passes (labeled, pseudo-labeled) precede one backward: buffers must not be re-broadcast.
    run.student = ray.train.torch.prepare_model(run.student, parallel_strategy_kwargs={"broadcast_buffers": False})
    store = ray.get_actor(config["store"])
    labeled = _epochs(ray.train.get_dataset_shard(LABELED), cfg.train.batch_size_labeled)
    fresh = None
    train, ssl = cfg.train, cfg.ssl
    while run.step < train.steps:
        pseudo = None
        if run.in_mutual_learning():
            if fresh is None:  # the stream starts once the first teacher is in the store
                if rank == 0:
                    ray.get(publish(store, run.step, run.teacher, run.published_thresholds()))
                _agree(True, device)
                fresh = FreshRows(ray.train.get_dataset_shard(UNLABELED), cfg.ray.labeler_batch_size, ssl.max_staleness)
            rows = fresh.take(train.batch_size_unlabeled, run.step)
            store.consumed.remote(fresh.pulled_since_last())
            if not _agree(rows is not None, device):
                break
            pseudo = _pseudo_batch(run, rows)
            run.last_pseudo = (pseudo.images, pseudo.targets)
            if fresh.label_seconds and run.step % train.log_period == 0:
                run.log({"labeler_images_per_s": fresh.taken / fresh.label_seconds,
                         "stale_rows_dropped": fresh.dropped, "pseudo_wait_seconds": fresh.wait_seconds})
        run.train_step(_labeled_batch(next(labeled), run.with_masks), pseudo)
        if rank == 0 and run.step > ssl.burn_in_steps and (run.step - ssl.burn_in_steps) % ssl.publish_interval == 0:
            publish(store, run.step, run.teacher, run.published_thresholds())
        if _periodic_report(run, fresh, rank):
            break
    _final_report(run, fresh, rank, store)


def _extra_metrics(fresh: FreshRows | None) -> dict[str, Any]:
    if fresh is None:
        return {"stale_rows_dropped": 0}
    return {"stale_rows_dropped": fresh.dropped, "pseudo_wait_seconds": fresh.wait_seconds,
            "labeler_images_per_s": fresh.taken / fresh.label_seconds if fresh.label_seconds else None}


def _periodic_report(run: TrainingRun, fresh: FreshRows | None, rank: int) -> bool:
    """Evaluate / checkpoint on schedule (rank 0 does the work, every rank reports). True = stop early."""
    train = run.cfg.train
    evaluate = run.step % train.eval_period == 0 and run.step < train.steps
    if evaluate and rank == 0:
        run.evaluate()
    if run.step % train.checkpoint_period == 0 and run.step < train.steps:
        _report(run, rank, {"step": run.step, **_latest_ap(run)}, with_checkpoint=True)
    return _agree(rank == 0 and run.target_reached(), run.device, op=dist.ReduceOp.MAX) if evaluate else False


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _final_report(run: TrainingRun, fresh: FreshRows | None, rank: int, store) -> None:
    per_worker = _gather({"rows": fresh.taken if fresh else 0, "versions": sorted(fresh.versions) if fresh else []})
    extra = {**_extra_metrics(fresh), **ray.get(store.counters.remote()),
             "pseudo_rows_per_worker": [w["rows"] for w in per_worker],
             "teacher_versions_seen": sorted({v for w in per_worker for v in w["versions"]})}
    metrics = run.finish(extra) if rank == 0 else {}
    _report(run, rank, {"step": run.step, **_latest_ap(run), "metrics_json": json.dumps(metrics)}, with_checkpoint=True)


def _latest_ap(run: TrainingRun) -> dict[str, float]:
    if not run.history:  # Tune's scheduler expects its metric in every report
        return {"teacher_AP": 0.0, "student_AP": 0.0}
    last = run.history[-1]
    return {"teacher_AP": last["teacher"]["bbox"]["AP"], "student_AP": last["student"]["bbox"]["AP"]}


def _report(run: TrainingRun, rank: int, metrics: dict[str, Any], with_checkpoint: bool) -> None:
    if rank != 0 or not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(run.state(), Path(directory) / CHECKPOINT_NAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
