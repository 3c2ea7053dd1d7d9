"""The distributed runner: Ray Data labeler actors feed a Ray Train DDP student; rank 0 keeps the EMA
teacher and publishes it to the weight store every `ssl.sync_interval` steps.

Staleness (student step minus the step of the teacher that labelled a row) is bounded by design:
input blocks of one labeler batch, one task in flight per labeler actor, one prefetched batch in the
trainer, so little is queued between labelers and trainer; rows older than `ssl.max_staleness` are
dropped and counted, never waited for, so the bound cannot deadlock.
"""
from __future__ import annotations

import json
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

from models.unbiased_teacher import Batch
from pipeline.augment import to_float
from pipeline.config import Config
from pipeline.errors import InputError, find_input_error
from pipeline.labeler import decode_masks
from pipeline.loop import TrainingRun, print_sink
from pipeline.preflight import check_model, check_run
from pipeline.resources import plan_resources, start_ray
from pipeline.session import CHECKPOINT_NAME, write_metrics
from pipeline.streams import LABELED, UNLABELED, build_datasets, data_config
from pipeline.weights import get_or_create_store, publish, store_name

def train_ray(cfg: Config, callbacks: list | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Check the inputs, plan resources, start or join Ray, fit the TorchTrainer, write metrics.json on the driver."""
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
        train_loop_config={"cfg": cfg.model_dump(), "run_dir": str(run_dir), "store": store_name(run_id),
                           "parent_run_id": parent_run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, "GPU": cfg.ray.gpus_per_worker},
        ),
        datasets=build_datasets(cfg, inputs, store_name(run_id)),
        dataset_config=data_config(plan),
        run_config=ray.train.RunConfig(
            name=f"ssod-{run_id}", storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    try:
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


def _latest_checkpoint(experiment: Path) -> Path | None:
    """The checkpoint Ray Train would resume this run from, if any."""
    if not experiment.is_dir():
        return None
    try:
        checkpoint = ray.train.Result.from_path(str(experiment)).checkpoint
    except Exception:  # unreadable run state: Ray decides on resuming, the worker checks the fit
        return None
    return Path(checkpoint.path) / CHECKPOINT_NAME if checkpoint else None


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
    while run.step < train.steps and run.stop_reason is None:  # every rank reaches the same stop_reason
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
                run.stop_reason = (f"{Path(cfg.data.prepared) / UNLABELED}: the unlabeled stream ran dry at step "
                                   f"{run.step} of {train.steps} (corrupt_rows_skipped in metrics.json)")
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
    extra = {**_extra_metrics(fresh), **ray.get(store.counters.remote()), **ray.get(store.skipped.remote()),
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
