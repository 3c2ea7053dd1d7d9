"""The local runner: burn-in then mutual learning in one process, no Ray. The reference for the Ray run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from models.pseudo_labels import PseudoLabelPolicy
from models.unbiased_teacher import Batch
from pipeline.config import Config
from pipeline.data.augment import to_float, to_model_target
from pipeline.data.rows import infinite_indices
from pipeline.data.samples import Views
from pipeline.data.schema import LABELED_DIR, UNLABELED_DIR
from pipeline.data.shards import Skipped, read_pool, read_rows
from pipeline.errors import InputError
from pipeline.preflight import RunInputs, check_run
from pipeline.tracking.console import print_sink
from pipeline.training.checkpoints import CHECKPOINT_NAME
from pipeline.training.feed import UnlabeledBatch, labeled_batch
from pipeline.training.hooks import Checkpointing, standard_hooks
from pipeline.training.loop import Loop
from pipeline.training.pseudo import PseudoLabels, pseudo_label_policy
from pipeline.training.state import RunState


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
        self.rows, self.where = rows, where
        self.views = Views(flip_prob, with_masks, where if skipped is None else skipped.add)
        self.order: Iterator[int] = infinite_indices(len(rows), seed)
        self.bad: set[int] = set()

    def next(self, n: int) -> list[tuple[dict[str, Any], Any, dict]]:
        """`n` (row, weak view, target) triples."""
        samples = []
        while len(samples) < n:
            index = next(self.order)
            if index in self.bad:
                continue
            sample = self.views.decode(self.rows[index])
            if sample is not None:
                samples.append((self.rows[index], *sample))
                continue
            self.bad.add(index)
            if len(self.bad) == len(self.rows):
                raise InputError(f"{self.where}: no image of the unlabeled pool decodes")
        return samples


class LocalFeed:
    """In-process streams of the prepared splits; the run's own teacher detects on the unlabeled one."""

    def __init__(self, run: RunState, inputs: RunInputs, policy: PseudoLabelPolicy):
        cfg, prepared = run.cfg, Path(run.cfg.data.prepared)
        self.teacher, self.device, self.policy, self.skipped = run.teacher, run.device, policy, inputs.skipped
        seed, flip = cfg.train.seed, cfg.data.flip_prob
        labeled = read_rows(prepared / LABELED_DIR)
        self.labeled_stream = SampleStream(labeled, seed, run.with_masks, flip, prepared / LABELED_DIR)
        pool = read_pool(inputs.pool, inputs.skipped)
        self.unlabeled_stream = SampleStream(pool, seed + 1, False, flip, prepared / UNLABELED_DIR, inputs.skipped)
        self.batch_size_labeled, self.batch_size_unlabeled = (
            cfg.train.batch_size_labeled,
            cfg.train.batch_size_unlabeled,
        )

    def labeled(self) -> Batch:
        samples = self.labeled_stream.next(self.batch_size_labeled)
        return labeled_batch([(image, Views.strong(image), to_model_target(target)) for _, image, target in samples])

    def unlabeled(self, step: int) -> UnlabeledBatch:
        samples = self.unlabeled_stream.next(self.batch_size_unlabeled)
        weak = [to_float(image).to(self.device) for _, image, _ in samples]
        detections = self.policy.detect(self.teacher, weak)
        return UnlabeledBatch(
            weak=weak,
            strong=[to_float(Views.strong(image)) for _, image, _ in samples],
            detections=detections,
            held_aside=[to_model_target(target) if row["annotated"] else None for row, _, target in samples],
        )

    def scalars(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return self.skipped.metrics()


def train_local(cfg: Config, sinks: list | None = None) -> dict[str, Any]:
    """Train in this process: check the inputs, resume from `train.output_dir`'s checkpoint if there is
    one, run the loop, and write metrics.json and the last checkpoint there.

    Args:
        cfg: the validated config (`train.backend` is not read here).
        sinks: more scalar sinks `(step, metrics) -> None` beside the console (and MLflow when tracked).

    Returns:
        metrics.json's content; `stop_reason` is not None when the run ended early (diverged, ran dry).
    """
    inputs = check_run(cfg)
    run_dir = Path(cfg.train.output_dir)
    run = RunState(cfg, run_dir, sinks=[print_sink, *(sinks or [])])
    if (run_dir / CHECKPOINT_NAME).exists():
        run.restore(run_dir / CHECKPOINT_NAME)
    policy = pseudo_label_policy(cfg, len(run.names))
    feed = LocalFeed(run, inputs, policy)
    return Loop(run, feed, PseudoLabels(policy), standard_hooks(run, Checkpointing(), feed.summary)).run()
