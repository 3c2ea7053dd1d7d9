"""The Ray Train worker: `TrainingRun.run` fed by this worker's dataset shards and the teacher weight store.

Rank 0 keeps the EMA teacher and publishes it to the store every `ssl.publish_interval` steps; the labeler
actors pull it from there. Rows labelled by a teacher more than `ssl.max_staleness` steps old are dropped
and counted, never waited for.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from models.unbiased_teacher import Batch, all_ranks_agree
from pipeline.config import Config
from pipeline.data.augment import to_float
from pipeline.distributed.labeler import batch_rows, decode_masks
from pipeline.distributed.streams import LABELED, UNLABELED
from pipeline.distributed.weights import publish
from pipeline.tracking.console import print_sink
from pipeline.training.loop import TrainingRun
from pipeline.training.session import CHECKPOINT_NAME, labeled_batch, save_checkpoint


def _epochs(shard, batch_size: int) -> Iterator[dict]:
    """Endless labeled batches; shards are equal-sized, so every rank crosses epochs at the same step."""
    while True:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)


class FreshRows:
    """Pseudo-labelled rows within `max_staleness` of the current step; older ones are dropped, counted."""

    def __init__(self, batches: Iterator[dict], max_staleness: int):
        self.rows = (row for batch in batches for row in batch_rows(batch))
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

    def summary(self) -> dict[str, Any]:
        return {
            "stale_rows_dropped": self.dropped,
            "pseudo_wait_seconds": self.wait_seconds,
            "labeler_images_per_s": self.taken / self.label_seconds if self.label_seconds else None,
        }


def _target(boxes, labels, masks=None, size: tuple[int, int] | None = None, scores=None) -> dict[str, torch.Tensor]:
    """Flat numpy columns of one row -> a detector target (or, with scores, a detection)."""
    target = {"boxes": torch.from_numpy(boxes.reshape(-1, 4)), "labels": torch.from_numpy(labels)}
    if masks is not None:
        target["masks"] = decode_masks(list(masks), *size)
    if scores is not None:
        target["scores"] = torch.from_numpy(scores)
    return target


def _labeled_sample(row: dict, with_masks: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    weak = torch.from_numpy(row["weak"])
    masks = row["masks"] if with_masks else None
    return weak, torch.from_numpy(row["strong"]), _target(row["boxes"], row["labels"], masks, weak.shape[1:])


class RayFeed:
    """This worker's shards, the weight store, and `ray.train.report` as the checkpoint."""

    def __init__(self, run: TrainingRun, store_name: str):
        cfg = run.cfg
        self.store, self.device, self.with_masks = ray.get_actor(store_name), run.device, run.with_masks
        if run.rank == 0:
            ray.get(self.store.begin_attempt.remote())
        all_ranks_agree(True, self.device)  # no rank's stream starts on the last attempt's store
        self.labeled = _epochs(ray.train.get_dataset_shard(LABELED), cfg.train.batch_size_labeled)
        self.fresh: FreshRows | None = None

    def labeled_batch(self) -> Batch:
        return labeled_batch([_labeled_sample(row, self.with_masks) for row in batch_rows(next(self.labeled))])

    def pseudo_batch(self, run: TrainingRun) -> Batch | None:
        cfg = run.cfg
        if self.fresh is None:  # the stream starts once the first teacher is in the store
            if run.rank == 0:
                ray.get(publish(self.store, run.step, run.teacher, run.scores.published()))
            all_ranks_agree(True, self.device)  # a barrier: no rank pulls before the publish
            shard = ray.train.get_dataset_shard(UNLABELED)
            batches = shard.iter_batches(
                batch_size=cfg.ray.labeler_batch_size, batch_format="numpy", prefetch_batches=1
            )
            self.fresh = FreshRows(batches, cfg.ssl.max_staleness)
        rows = self.fresh.take(cfg.train.batch_size_unlabeled, run.step)
        self.store.consumed.remote(self.fresh.pulled_since_last())
        if rows is None:
            return None
        if self.fresh.label_seconds and run.step % cfg.train.log_period == 0:
            run.log(self.fresh.summary())
        return run.pseudo_batch(*self._pseudo_inputs(run, rows))

    @staticmethod
    def _pseudo_inputs(run: TrainingRun, rows: list[dict]) -> tuple[list, list, list, list]:
        weak, strong, kept, held_aside = [], [], [], []
        for row in rows:
            image = torch.from_numpy(row["image"])
            masks = row["pl_masks"] if run.with_masks else None
            kept.append(_target(row["pl_boxes"], row["pl_labels"], masks, image.shape[1:], row["pl_scores"]))
            if "pl_proposal_boxes" in row:  # soft background weighting: the teacher's proposals ride along
                kept[-1].update(
                    proposal_boxes=torch.from_numpy(row["pl_proposal_boxes"].reshape(-1, 4)),
                    proposal_background=torch.from_numpy(row["pl_proposal_background"]),
                    image_size=torch.tensor(image.shape[1:]),
                )
            held_aside.append(_target(row["gt_boxes"], row["gt_labels"]) if row["annotated"] else None)
            if run.rank == 0:  # rank 0 fits the thresholds it publishes
                run.scores.observe(
                    [
                        {
                            "labels": torch.from_numpy(row["teacher_labels"]),
                            "scores": torch.from_numpy(row["teacher_scores"]),
                        }
                    ]
                )
            run.stats.add_staleness(run.step - int(row["teacher_version"]))
            weak.append(to_float(image))
            strong.append(to_float(torch.from_numpy(row["strong"])))
        return weak, strong, kept, held_aside

    def after_step(self, run: TrainingRun) -> None:
        ssl = run.cfg.ssl
        if (
            run.rank == 0
            and run.step > ssl.burn_in_steps
            and (run.step - ssl.burn_in_steps) % ssl.publish_interval == 0
        ):
            publish(self.store, run.step, run.teacher, run.scores.published())

    def any_rank(self, flag: bool) -> bool:
        return all_ranks_agree(flag, self.device, any_rank=True)

    def checkpoint(self, run: TrainingRun) -> None:
        _report(run, {"step": run.step, **_latest_ap(run)})

    def finish(self, run: TrainingRun) -> dict[str, Any]:
        fresh = self.fresh
        per_worker = _gather({"rows": fresh.taken if fresh else 0, "versions": sorted(fresh.versions) if fresh else []})
        extra = {
            **(fresh.summary() if fresh else {"stale_rows_dropped": 0}),
            **ray.get(self.store.counters.remote()),
            **ray.get(self.store.skipped.remote()),
            "pseudo_rows_per_worker": [w["rows"] for w in per_worker],
            "teacher_versions_seen": sorted({v for w in per_worker for v in w["versions"]}),
        }
        metrics = run.finish(extra) if run.rank == 0 else {}
        if run.rank == 0 and run.stop_reason is None:  # beside metrics.json, as the local runner leaves it
            save_checkpoint(run.state(), run.run_dir)
        _report(run, {"step": run.step, **_latest_ap(run), "metrics_json": json.dumps(metrics)})
        return metrics


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    run = TrainingRun(
        cfg,
        config["run_dir"],
        rank=rank,
        device=device,
        parent_run_id=config.get("parent_run_id"),
        sinks=[print_sink] if rank == 0 else None,
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            run.restore(Path(directory) / CHECKPOINT_NAME)
    # Two forward passes (labeled, pseudo-labeled) precede one backward: buffers must not be re-broadcast.
    run.student = ray.train.torch.prepare_model(run.student, parallel_strategy_kwargs={"broadcast_buffers": False})
    run.run(RayFeed(run, config["store"]))


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _latest_ap(run: TrainingRun) -> dict[str, float]:
    if not run.history:  # Tune's scheduler expects its metric in every report
        return {"teacher_AP": 0.0, "student_AP": 0.0}
    last = run.history[-1]
    return {"teacher_AP": last["teacher"]["bbox"]["AP"], "student_AP": last["student"]["bbox"]["AP"]}


def _report(run: TrainingRun, metrics: dict[str, Any]) -> None:
    """Every rank reports; rank 0's report carries the checkpoint."""
    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(run.state(), Path(directory) / CHECKPOINT_NAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
