"""The local runner: burn-in then mutual learning in one process, no Ray. The reference for the Ray run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.augment import weak_transform
from pipeline.config import Config
from pipeline.data import DECODE_FAILURES, decode_row, infinite_indices
from pipeline.errors import InputError
from pipeline.loop import TrainingRun, print_sink
from pipeline.preflight import check_run
from pipeline.schema import LABELED_DIR, UNLABELED_DIR
from pipeline.session import CHECKPOINT_NAME, labeled_batch, save_checkpoint
from pipeline.shards import Skipped, read_pool, read_rows


class SampleStream:
    """Endless, reshuffled weak views of one prepared split, decoded on demand.

    With `skipped` (the unlabeled pool) an undecodable image is skipped and counted; without it (the
    labeled split) it is an InputError naming the image.
    """

    def __init__(self, rows: list[dict[str, Any]], seed: int, with_masks: bool, flip_prob: float,
                 where: Path, skipped: Skipped | None = None):
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


def train_local(cfg: Config, sinks: list | None = None) -> dict[str, Any]:
    inputs = check_run(cfg)
    run_dir = Path(cfg.train.output_dir)
    run = TrainingRun(cfg, run_dir, sinks=[print_sink, *(sinks or [])])
    if (run_dir / CHECKPOINT_NAME).exists():
        run.restore(run_dir / CHECKPOINT_NAME)
    prepared, train = Path(cfg.data.prepared), cfg.train
    labeled = SampleStream(read_rows(prepared / LABELED_DIR), train.seed, run.with_masks, cfg.data.flip_prob,
                           prepared / LABELED_DIR)
    unlabeled = SampleStream(read_pool(inputs.pool, inputs.skipped), train.seed + 1, False, cfg.data.flip_prob,
                             prepared / UNLABELED_DIR, inputs.skipped)
    while run.step < train.steps and not run.target_reached() and run.stop_reason is None:
        pseudo = None
        if run.in_mutual_learning():
            samples = unlabeled.next(train.batch_size_unlabeled)
            pseudo = run.pseudo_label([image for _, image, _ in samples],
                                      [t if row["annotated"] else None for row, _, t in samples])
        run.train_step(labeled_batch([(i, t) for _, i, t in labeled.next(train.batch_size_labeled)]),
                       pseudo)
        if run.should_evaluate():
            run.evaluate()
        if run.step % train.checkpoint_period == 0 and run.stop_reason is None:
            save_checkpoint(run.state(), run_dir)
    metrics = run.finish(inputs.skipped.metrics())
    if run.stop_reason is None:  # a diverged run keeps its last periodic checkpoint, not the broken weights
        save_checkpoint(run.state(), run_dir)
    return metrics
