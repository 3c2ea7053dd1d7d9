"""The local runner: burn-in then mutual learning in one process, no Ray. The reference for the Ray run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.augment import weak_transform
from pipeline.config import Config
from pipeline.data import decode_row, infinite_indices, read_rows, require_segmentations
from pipeline.loop import TrainingRun, print_sink
from pipeline.schema import LABELED_DIR, UNLABELED_DIR
from pipeline.session import CHECKPOINT_NAME, labeled_batch, save_checkpoint


class SampleStream:
    """Endless, reshuffled weak views of one prepared split, decoded on demand."""

    def __init__(self, rows: list[dict[str, Any]], seed: int, with_masks: bool, flip_prob: float):
        self.rows, self.with_masks = rows, with_masks
        self.order: Iterator[int] = infinite_indices(len(rows), seed)
        self.weak = weak_transform(flip_prob)

    def next(self, n: int) -> list[tuple[dict[str, Any], Any, dict]]:
        rows = [self.rows[next(self.order)] for _ in range(n)]
        return [(row, *self.weak(*decode_row(row, self.with_masks))) for row in rows]


def train_local(cfg: Config, sinks: list | None = None) -> dict[str, Any]:
    if cfg.model.arch == "mask_rcnn":
        require_segmentations(cfg.data.prepared)
    run_dir = Path(cfg.train.output_dir)
    run = TrainingRun(cfg, run_dir, sinks=[print_sink, *(sinks or [])])
    if (run_dir / CHECKPOINT_NAME).exists():
        run.restore(run_dir / CHECKPOINT_NAME)
    prepared, train = Path(cfg.data.prepared), cfg.train
    labeled = SampleStream(read_rows(prepared / LABELED_DIR), train.seed, run.with_masks, cfg.data.flip_prob)
    unlabeled = SampleStream(read_rows(prepared / UNLABELED_DIR), train.seed + 1, False, cfg.data.flip_prob)
    while run.step < train.steps and not run.target_reached():
        pseudo = None
        if run.in_mutual_learning():
            samples = unlabeled.next(train.batch_size_unlabeled)
            pseudo = run.pseudo_label([image for _, image, _ in samples],
                                      [t if row["annotated"] else None for row, _, t in samples])
        run.train_step(labeled_batch([(i, t) for _, i, t in labeled.next(train.batch_size_labeled)]),
                       pseudo)
        if run.should_evaluate():
            run.evaluate()
        if run.step % train.checkpoint_period == 0:
            save_checkpoint(run.state(), run_dir)
    metrics = run.finish()
    save_checkpoint(run.state(), run_dir)
    return metrics
