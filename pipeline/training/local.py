"""The local runner: burn-in then mutual learning in one process, no Ray. The reference for the Ray run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from models.unbiased_teacher import Batch
from pipeline.config import Config
from pipeline.data.augment import strong_view, to_float, to_model_target, weak_transform
from pipeline.data.rows import DECODE_FAILURES, decode_row, infinite_indices
from pipeline.data.schema import LABELED_DIR, UNLABELED_DIR
from pipeline.data.shards import Skipped, read_pool, read_rows
from pipeline.errors import InputError
from pipeline.preflight import RunInputs, check_run
from pipeline.tracking.console import print_sink
from pipeline.training.loop import TrainingRun
from pipeline.training.session import CHECKPOINT_NAME, labeled_batch, pseudo_label_policy, save_checkpoint


class SampleStream:
    """Endless, reshuffled weak views of one prepared split, decoded on demand.

    With `skipped` (the unlabeled pool) an undecodable image is skipped and counted; without it (the
    labeled split) it is an InputError naming the image.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        seed: int,
        with_masks: bool,
        flip_prob: float,
        where: Path,
        skipped: Skipped | None = None,
    ):
        self.rows, self.with_masks, self.where, self.skipped = rows, with_masks, where, skipped
        self.order: Iterator[int] = infinite_indices(len(rows), seed)
        self.weak = weak_transform(flip_prob)
        self.bad: set[int] = set()

    def next(self, n: int) -> list[tuple[dict[str, Any], Any, dict]]:
        samples = []
        while len(samples) < n:
            index = next(self.order)
            if index in self.bad:
                continue
            row = self.rows[index]
            try:
                samples.append((row, *self.weak(*decode_row(row, self.with_masks))))
            except DECODE_FAILURES:
                self._undecodable(index, row)
        return samples

    def _undecodable(self, index: int, row: dict[str, Any]) -> None:
        if self.skipped is None:
            raise InputError(f"{self.where}: image {row['image_id']} does not decode; run `ssod prepare` again")
        self.bad.add(index)
        self.skipped.add(f"image {row['image_id']}", 1, "undecodable image bytes")
        if len(self.bad) == len(self.rows):
            raise InputError(f"{self.where}: no image of the unlabeled pool decodes")


class LocalFeed:
    """In-process streams of the prepared splits; the run's own teacher labels the unlabeled one."""

    def __init__(self, cfg: Config, with_masks: bool, inputs: RunInputs, num_classes: int):
        prepared, train = Path(cfg.data.prepared), cfg.train
        self.policy = pseudo_label_policy(cfg, num_classes)
        self.labeled = SampleStream(
            read_rows(prepared / LABELED_DIR), train.seed, with_masks, cfg.data.flip_prob, prepared / LABELED_DIR
        )
        self.unlabeled = SampleStream(
            read_pool(inputs.pool, inputs.skipped),
            train.seed + 1,
            False,
            cfg.data.flip_prob,
            prepared / UNLABELED_DIR,
            inputs.skipped,
        )
        self.skipped = inputs.skipped
        self.batch_size_labeled, self.batch_size_unlabeled = train.batch_size_labeled, train.batch_size_unlabeled

    def labeled_batch(self) -> Batch:
        return labeled_batch(
            [
                (image, strong_view(image), to_model_target(target))
                for _, image, target in self.labeled.next(self.batch_size_labeled)
            ]
        )

    def pseudo_batch(self, run: TrainingRun) -> Batch:
        samples = self.unlabeled.next(self.batch_size_unlabeled)
        weak = [to_float(image).to(run.device) for _, image, _ in samples]
        detections = self.policy.detect(run.teacher, weak)
        run.scores.observe(detections)
        kept = self.policy.keep(detections, run.scores.threshold)
        strong = [to_float(strong_view(image)) for _, image, _ in samples]
        held_aside = [to_model_target(target) if row["annotated"] else None for row, _, target in samples]
        return run.pseudo_batch(weak, strong, kept, held_aside)

    def after_step(self, run: TrainingRun) -> None:
        pass  # the teacher lives in this process: nothing to publish

    def any_rank(self, flag: bool) -> bool:
        return flag

    def checkpoint(self, run: TrainingRun) -> None:
        save_checkpoint(run.state(), run.run_dir)

    def finish(self, run: TrainingRun) -> dict[str, Any]:
        metrics = run.finish(self.skipped.metrics())
        if run.stop_reason is None:  # a diverged run keeps its last periodic checkpoint, not the broken weights
            save_checkpoint(run.state(), run.run_dir)
        return metrics


def train_local(cfg: Config, sinks: list | None = None) -> dict[str, Any]:
    inputs = check_run(cfg)
    run_dir = Path(cfg.train.output_dir)
    run = TrainingRun(cfg, run_dir, sinks=[print_sink, *(sinks or [])])
    if (run_dir / CHECKPOINT_NAME).exists():
        run.restore(run_dir / CHECKPOINT_NAME)
    return run.run(LocalFeed(cfg, run.with_masks, inputs, len(run.names)))
