"""The Ray Train worker: the training loop fed by this worker's dataset shards and the teacher weight store.

Rank 0 keeps the EMA teacher and publishes it to the store every `ssl.sync_interval` steps; the labeler
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

from models.ranks import all_ranks_agree, gather
from models.unbiased_teacher import Batch, in_mutual_learning
from pipeline.config import Config
from pipeline.data.augment import to_float
from pipeline.distributed.columns import batch_rows, class_probs, to_target
from pipeline.distributed.streams import LABELED, UNLABELED
from pipeline.distributed.weights import publish
from pipeline.tracking.console import print_sink
from pipeline.training.checkpoints import CHECKPOINT_NAME
from pipeline.training.feed import UnlabeledBatch, labeled_batch
from pipeline.training.hooks import Checkpointing, standard_hooks
from pipeline.training.loop import Hook, Loop
from pipeline.training.pseudo import PseudoLabels
from pipeline.training.state import RunState


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


class RayFeed:
    """This worker's dataset shards; the unlabeled one starts once `PublishTeacher` put a teacher in the store."""

    def __init__(self, cfg: Config, rank: int, device: torch.device, store: ray.actor.ActorHandle):
        self.cfg, self.store, self.device = cfg, store, device
        self.with_masks = cfg.model.arch == "mask_rcnn"
        if rank == 0:
            ray.get(self.store.begin_attempt.remote())
        all_ranks_agree(True, device)  # no rank's stream starts on the last attempt's store
        self.labeled_batches = _epochs(ray.train.get_dataset_shard(LABELED), cfg.train.batch_size_labeled)
        self.fresh: FreshRows | None = None

    def labeled(self) -> Batch:
        samples = []
        for row in batch_rows(next(self.labeled_batches)):
            weak, masks = torch.from_numpy(row["weak"]), row["masks"] if self.with_masks else None
            target = to_target(row["boxes"], row["labels"], masks, weak.shape[1:])
            samples.append((weak, torch.from_numpy(row["strong"]), target))
        return labeled_batch(samples)

    def unlabeled(self, step: int) -> UnlabeledBatch | None:
        if self.fresh is None:
            shard = ray.train.get_dataset_shard(UNLABELED)
            batches = shard.iter_batches(
                batch_size=self.cfg.ray.labeler_batch_size, batch_format="numpy", prefetch_batches=1
            )
            self.fresh = FreshRows(batches, self.cfg.ssl.max_staleness)
        rows = self.fresh.take(self.cfg.train.batch_size_unlabeled, step)
        self.store.consumed.remote(self.fresh.pulled_since_last())
        return None if rows is None else self._batch(rows)

    def _batch(self, rows: list[dict]) -> UnlabeledBatch:
        batch = UnlabeledBatch([], [], [], [], kept=[], teacher_versions=[])
        for row in rows:
            image = torch.from_numpy(row["image"])
            masks = row["pl_masks"] if self.with_masks else None
            kept = to_target(row["pl_boxes"], row["pl_labels"], masks, image.shape[1:], row["pl_scores"])
            if "pl_proposal_boxes" in row:  # soft background weighting: the teacher's proposals ride along
                kept.update(
                    proposal_boxes=torch.from_numpy(row["pl_proposal_boxes"].reshape(-1, 4)),
                    proposal_background=torch.from_numpy(row["pl_proposal_background"]),
                    image_size=torch.tensor(image.shape[1:]),
                )
            if "pl_class_probs" in row:  # soft class targets
                kept["class_probs"] = class_probs(row["pl_class_probs"], len(kept["labels"]))
            batch.kept.append(kept)
            batch.detections.append(
                {"labels": torch.from_numpy(row["teacher_labels"]), "scores": torch.from_numpy(row["teacher_scores"])}
            )
            batch.held_aside.append(to_target(row["gt_boxes"], row["gt_labels"]) if row["annotated"] else None)
            batch.teacher_versions.append(int(row["teacher_version"]))
            batch.weak.append(to_float(image))
            batch.strong.append(to_float(torch.from_numpy(row["strong"])))
        return batch

    def scalars(self) -> dict[str, float]:
        return self.fresh.summary() if self.fresh is not None and self.fresh.label_seconds else {}

    def summary(self) -> dict[str, Any]:
        fresh = self.fresh
        per_worker = gather({"rows": fresh.taken if fresh else 0, "versions": sorted(fresh.versions) if fresh else []})
        return {
            **(fresh.summary() if fresh else {"stale_rows_dropped": 0}),
            **ray.get(self.store.counters.remote()),
            **ray.get(self.store.skipped.remote()),
            "pseudo_rows_per_worker": [w["rows"] for w in per_worker],
            "teacher_versions_seen": sorted({v for w in per_worker for v in w["versions"]}),
        }


class PublishTeacher(Hook):
    """Rank 0 puts the teacher (and the adaptive thresholds) in the weight store: before the first
    pseudo-labeled step, while every rank waits, then every `ssl.sync_interval` steps of mutual learning."""

    def __init__(self, store: ray.actor.ActorHandle):
        self.store, self.started = store, False

    def before_step(self, run: RunState) -> None:
        if self.started or not in_mutual_learning(run.step + 1, run.cfg.ssl.burn_in_steps):
            return
        if run.rank == 0:
            ray.get(publish(self.store, run.step, run.teacher, run.scores.published()))
        all_ranks_agree(True, run.device)  # a barrier: no rank pulls before the publish
        self.started = True

    def after_step(self, run: RunState) -> None:
        ssl = run.cfg.ssl
        if run.rank == 0 and run.step > ssl.burn_in_steps and (run.step - ssl.burn_in_steps) % ssl.sync_interval == 0:
            publish(self.store, run.step, run.teacher, run.scores.published())


class RayCheckpointing(Checkpointing):
    """Checkpoints go to Ray Train with every rank's report (rank 0's carries it); the last report also
    carries metrics.json for the driver."""

    def save(self, run: RunState) -> None:
        _report(run, {"step": run.step, **run.latest_ap()})

    def after_run(self, run: RunState) -> None:
        super().after_run(run)  # beside metrics.json, as the local runner leaves it
        _report(run, {"step": run.step, **run.latest_ap(), "metrics_json": json.dumps(run.metrics)})


def _report(run: RunState, metrics: dict[str, Any]) -> None:
    """Every rank reports (Tune's scheduler expects its metric in each); rank 0's report carries the checkpoint."""
    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(run.state(), Path(directory) / CHECKPOINT_NAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's worker function: one train worker's run, resumed from Ray Train's checkpoint if any.

    Args:
        config: `cfg` (the config as a dict), `run_dir`, `store` (the weight store's actor name) and
            `parent_run_id` (the Tune trial's MLflow parent run, or None).
    """
    cfg = Config.model_validate(config["cfg"])
    rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    run = RunState(cfg, config["run_dir"], rank=rank, device=device, sinks=[print_sink] if rank == 0 else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            run.restore(Path(directory) / CHECKPOINT_NAME)
    # Two forward passes (labeled, pseudo-labeled) precede one backward: buffers must not be re-broadcast.
    run.wrap_student(
        lambda student: ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"broadcast_buffers": False})
    )
    store = ray.get_actor(config["store"])
    feed = RayFeed(cfg, rank, device, store)
    hooks = standard_hooks(
        run,
        RayCheckpointing(),
        feed.summary,
        publisher=PublishTeacher(store),
        stream_scalars=feed.scalars,
        parent_run_id=config.get("parent_run_id"),
    )
    Loop(run, feed, PseudoLabels(), hooks).run()
