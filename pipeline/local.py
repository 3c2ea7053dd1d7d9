"""The local runner: burn-in then mutual learning in one process, no Ray. The reference for the Ray run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from models.pseudo_labels import filter_detections, teacher_detections
from models.unbiased_teacher import Batch
from pipeline.augment import strong_view, to_float, to_model_target, weak_transform
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


class LocalFeed:
    """In-process streams of the prepared splits; the run's own teacher labels the unlabeled one."""

    def __init__(self, cfg: Config, with_masks: bool):
        prepared, train = Path(cfg.data.prepared), cfg.train
        self.labeled = SampleStream(read_rows(prepared / LABELED_DIR), train.seed, with_masks, cfg.data.flip_prob)
        self.unlabeled = SampleStream(read_rows(prepared / UNLABELED_DIR), train.seed + 1, False, cfg.data.flip_prob)
        self.batch_size_labeled, self.batch_size_unlabeled = train.batch_size_labeled, train.batch_size_unlabeled

    def labeled_batch(self) -> Batch:
        return labeled_batch([(image, strong_view(image), to_model_target(target))
                              for _, image, target in self.labeled.next(self.batch_size_labeled)])

    def pseudo_batch(self, run: TrainingRun) -> Batch:
        samples = self.unlabeled.next(self.batch_size_unlabeled)
        weak = [to_float(image).to(run.device) for _, image, _ in samples]
        detections = teacher_detections(run.teacher, weak)
        run.observe_scores(detections)
        kept = [filter_detections(d, run.score_threshold) for d in detections]
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
        metrics = run.finish()
        save_checkpoint(run.state(), run.run_dir)
        return metrics


def train_local(cfg: Config, sinks: list | None = None) -> dict[str, Any]:
    if cfg.model.arch == "mask_rcnn":
        require_segmentations(cfg.data.prepared)
    run_dir = Path(cfg.train.output_dir)
    run = TrainingRun(cfg, run_dir, sinks=[print_sink, *(sinks or [])])
    if (run_dir / CHECKPOINT_NAME).exists():
        run.restore(run_dir / CHECKPOINT_NAME)
    return run.run(LocalFeed(cfg, run.with_masks))
