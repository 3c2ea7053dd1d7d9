"""`ssod label`: a trained teacher labels an image folder or a prepared split, at cluster scale.

Ray Data streams the images through the training's `TeacherLabeler` actors (an actor pool, GPU when
`ray.gpus_per_labeler` asks for one); the driver takes the labelled rows one batch at a time and writes
them out as they come, so its memory stays flat in the pool size. Outputs in OUT: `labels.json` (COCO),
`label_report.json`, `review.json` and `review/` (see `pipeline.labeling.review`).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from models.pseudo_labels import PseudoLabelPolicy
from pipeline.config import Config
from pipeline.data.coco_io import Report, write_json
from pipeline.data.readers import ImageFolder, list_image_folder, load_split, read_image_folder, read_prepared
from pipeline.data.schema import LABELED_DIR, UNLABELED_DIR, VAL_DIR
from pipeline.distributed.cluster import start_ray
from pipeline.distributed.columns import batch_rows, decode_masks
from pipeline.distributed.labeler import TeacherLabeler
from pipeline.distributed.resources import data_context, plan_labeling
from pipeline.distributed.weights import get_or_create_store, store_name
from pipeline.errors import InputError
from pipeline.labeling import review
from pipeline.labeling.coco_writer import CocoWriter, annotations
from pipeline.labeling.model import LabelModel, label_thresholds
from pipeline.labeling.report import SWEEP, Clock, Tally, quality

FIRST_IMAGE_ID = 1  # an image folder's ids: 1, 2, ... in sorted path order
SPLIT_COUNTS = {LABELED_DIR: "num_labeled", UNLABELED_DIR: "num_unlabeled", VAL_DIR: "num_val"}
# One fixed teacher: staleness means nothing here, so the training's credit gate is opened wide.
NO_STALENESS_BOUND = 10**9
PROGRESS_INTERVAL_S = 2.0
LABELER_BATCHES_PER_BLOCK = 4
BLOCK_SAMPLE_FILES = 256  # an image folder's bytes per image: from its first files


@dataclass(frozen=True)
class LabelJob:
    """What to label and where to write: exactly one of `images` (a folder) and `prepared` (a split of it)."""

    out: Path
    images: str | None = None
    prepared: str | None = None
    split: str = UNLABELED_DIR
    threshold: float | None = None
    review: int = 16
    sweep: bool = False


@dataclass
class _Source:
    """An image folder (listed) or a prepared split; `dataset()` reads it (inside the run's Ray Data settings)."""

    name: str
    total: int | None
    folder: ImageFolder | None = None
    split_dir: tuple[str, str] | None = None  # (prepared directory, split)

    def dataset(self) -> ray.data.Dataset:
        if self.folder is not None:
            return read_image_folder(self.folder, start_id=FIRST_IMAGE_ID)
        return read_prepared(*self.split_dir)


class _Labels:
    """Everything the driver makes of the labelled rows: the COCO file, the tally, the review queue."""

    def __init__(self, model: LabelModel, job: LabelJob, thresholds: list[float], folder: ImageFolder | None):
        self.with_masks = model.cfg.model.arch == "mask_rcnn"
        self.per_label = np.asarray(thresholds, dtype=np.float32)
        self.category_of, self.names = {c["label"]: c["id"] for c in model.categories}, model.names
        coco = [{"id": c["id"], "name": c["name"]} for c in sorted(model.categories, key=lambda c: c["id"])]
        self.writer = CocoWriter(job.out / "labels.json", coco, {"description": f"ssod label: {model.source}"})
        self.tally, self.queue = Tally(job.sweep), review.ReviewQueue(job.review)
        self.seen = bytearray(len(folder.files)) if folder else None  # which of the folder's files came back

    def add(self, row: dict) -> None:
        image_id, file_name = int(row["image_id"]), str(row["file_name"])
        kept = row["pl_scores"] >= self.per_label[row["pl_labels"]]
        masks = [m for m, k in zip(row["pl_masks"], kept) if k] if self.with_masks else None
        height, width = row["image"].shape[1:]
        self.writer.add(
            {"id": image_id, "file_name": file_name, "width": width, "height": height},
            annotations(
                row["pl_boxes"].reshape(-1, 4)[kept],
                row["pl_labels"][kept],
                row["pl_scores"][kept],
                masks,
                self.category_of,
            ),
        )
        self.tally.add(row, kept)
        if self.seen is not None:
            self.seen[image_id - FIRST_IMAGE_ID] = 1
        u = review.uncertainty(row["teacher_labels"], row["teacher_scores"], self.per_label)
        self.queue.offer(
            image_id, u, {"file_name": file_name, "kept_boxes": int(kept.sum())}, lambda: self._picture(row, kept)
        )

    def _picture(self, row: dict, kept: np.ndarray) -> tuple[torch.Tensor, dict]:
        """The image with its kept boxes and the band's dropped ones, captioned `name score` (+ `dropped`)."""
        shown = row["pl_scores"] >= self.per_label[row["pl_labels"]] - review.BAND_BELOW
        image, labels, scores = torch.tensor(row["image"]), row["pl_labels"][shown], row["pl_scores"][shown]
        target = {
            "boxes": torch.tensor(row["pl_boxes"].reshape(-1, 4)[shown]),
            "labels": torch.tensor(labels),
            "captions": [
                f"{self.names[int(k)]} {s:.2f}" + ("" if keep else " dropped")
                for k, s, keep in zip(labels, scores, kept[shown])
            ],
        }
        if self.with_masks:
            target["masks"] = decode_masks([m for m, k in zip(row["pl_masks"], shown) if k], *image.shape[1:])
        return image, target


def label(model: LabelModel, job: LabelJob) -> dict[str, Any]:
    """Label every image of the job's source with `model`; returns (and writes) the label report."""
    _check(job)
    # no flip, no staleness bound (one fixed teacher), no trainers: what the training plan checks is moot
    cfg = model.cfg.with_overrides(
        {"data.flip_prob": 0.0, "ssl.max_staleness": NO_STALENESS_BOUND, "ray.num_workers": 1, "train.device": "auto"}
    )
    thresholds, rule = label_thresholds(model, job.threshold)
    # the labeler keeps every box the sweep and the review pictures may need
    floor = min([*(t - review.BAND_BELOW for t in thresholds[1:]), *(SWEEP if job.sweep else ())])
    source = _source(job)
    job.out.mkdir(parents=True, exist_ok=True)
    start_ray(cfg, plan_labeling(cfg))
    clock = Clock()
    # one progress bar (ours); blocks of a few labeler batches, so that every actor gets work and rows stream
    with data_context(enable_progress_bars=False, **_block_bytes(job, source, cfg.ray.labeler_batch_size)):
        labels = _Labels(model, job, thresholds, source.folder)
        try:
            with _weight_store(model.state, [floor] * len(thresholds)) as name:
                for row in _rows(_labelled(cfg, len(model.categories), source, name), source.total, clock):
                    labels.add(row)
        except BaseException:
            labels.writer.discard()
            raise
    labels.writer.close()
    report = _report(model, source, labels, thresholds, rule, clock)
    write_json(job.out / "label_report.json", report)
    grids = _write_review(labels.queue, model.names, job.out)
    _track(cfg, job.out, report, grids)
    return report


def _check(job: LabelJob) -> None:
    if (job.images is None) == (job.prepared is None):
        raise InputError("give exactly one of --images DIR and --prepared DIR")
    if job.prepared is not None and job.split not in SPLIT_COUNTS:
        raise InputError(f"--split {job.split}: expected one of {', '.join(SPLIT_COUNTS)}")
    if job.review < 0:
        raise InputError(f"--review {job.review}: must be 0 or more")
    if job.threshold is not None and not 0 < job.threshold <= 1:
        raise InputError(f"--threshold {job.threshold}: must be in (0, 1]")


def _source(job: LabelJob) -> _Source:
    if job.images is not None:
        folder = list_image_folder(job.images)
        return _Source(str(job.images), len(folder.files), folder=folder)
    total = load_split(job.prepared).get(SPLIT_COUNTS[job.split])
    return _Source(f"{job.prepared} ({job.split})", total, split_dir=(job.prepared, job.split))


@contextlib.contextmanager
def _weight_store(state: dict[str, torch.Tensor], thresholds: list[float]) -> Iterator[str]:
    """The training's weight store, holding one teacher (version 0) for the labelers to pull."""
    name = store_name(f"label-{uuid.uuid4().hex[:12]}")
    store = get_or_create_store(name)
    try:
        ray.get(store.publish.remote(0, state, thresholds))
        yield name
    finally:
        ray.kill(store)


def _labelled(cfg: Config, num_classes: int, source: _Source, store: str) -> ray.data.Dataset:
    r = cfg.ray
    return source.dataset().map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={
            "config": cfg.model_dump(),
            "num_classes": num_classes,
            "store_name": store,
            "policy": PseudoLabelPolicy(tta=cfg.ssl.teacher_tta),  # the run's TTA; the count is the reviewer's
        },
        compute=ActorPoolStrategy(size=r.num_labelers),
        batch_size=r.labeler_batch_size,
        num_cpus=r.cpus_per_labeler,
        num_gpus=r.gpus_per_labeler,
    )


def _block_bytes(job: LabelJob, source: _Source, batch_size: int) -> dict[str, int]:
    """`target_max_block_size` for about LABELER_BATCHES_PER_BLOCK labeler batches of encoded images
    (nothing when the size on disk is not known here, as for a remote prepared directory)."""
    if source.folder is not None:
        sample = source.folder.fs.get_file_info(source.folder.files[:BLOCK_SAMPLE_FILES])
        per_row = sum(i.size for i in sample) / len(sample)
    else:
        shards = (Path(job.prepared) / job.split).glob("*.parquet")
        per_row = sum(f.stat().st_size for f in shards) / max(source.total or 0, 1)
    size = int(per_row * batch_size * LABELER_BATCHES_PER_BLOCK)
    return {"target_max_block_size": size} if size > 0 else {}


def _rows(dataset: ray.data.Dataset, total: int, clock: Clock) -> Iterator[dict]:
    """Labelled rows as they stream out, with a progress bar (images done / total, images/s) on stderr."""
    with tqdm(total=total, unit="img", desc="label", file=sys.stderr, mininterval=PROGRESS_INTERVAL_S) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            size = len(batch["image_id"])
            clock.block(size)
            yield from batch_rows(batch)
            bar.update(size)


def _skipped(labels: _Labels, source: _Source) -> Report:
    skipped = Report()
    if labels.seen is not None:
        for i in (i for i, seen in enumerate(labels.seen) if not seen):
            skipped.add("undecodable", source.folder.file_name(source.folder.files[i]))
    elif source.total is not None and source.total > labels.tally.read:
        skipped.add("unreadable", source.name, source.total - labels.tally.read)
    return skipped


def _report(
    model: LabelModel, source: _Source, labels: _Labels, thresholds: list[float], rule: str, clock: Clock
) -> dict[str, Any]:
    tally, names, skipped = labels.tally, model.names, _skipped(labels, source)
    report = {
        "model": model.source,
        "weights_load": model.weights_load,
        "source": source.name,
        "threshold": {"rule": rule, "per_class": {names[k]: thresholds[k] for k in sorted(names)}},
        "images_found": source.total,
        "images_read": tally.read,
        "images_labeled": tally.labeled,
        "images_skipped": dict(skipped.counts),
        "skipped_examples": skipped.examples,
        "boxes": sum(tally.per_class.values()),
        "boxes_per_class": {names[k]: tally.per_class.get(k, 0) for k in sorted(names)},
        **clock.rates(tally.read),
        # one actor's own rate (decode, teacher, thresholding), averaged over the actors
        "images_per_s_per_actor": round(tally.read / tally.label_seconds, 3) if tally.label_seconds else None,
        # matched one-to-one at IoU >= 0.5 and the same class, as training's pseudo-label statistics are
        "quality": quality(tally.quality) if tally.quality.images else None,
    }
    if tally.sweep:
        report["sweep"] = [{"threshold": t, **quality(s)} for t, s in tally.sweep.items()]
    return report


def _write_review(queue: review.ReviewQueue, names: dict[int, str], out: Path) -> list[Path]:
    grids = review.write_grids(queue.pictures(), names, out / "review")
    write_json(
        out / "review.json",
        {
            "rule": review.rule_text(),
            "images_ranked": queue.seen,
            "grids": [g.relative_to(out).as_posix() for g in grids],
            "images": queue.ranked(),
        },
    )
    return grids


def _track(cfg: Config, out: Path, report: dict[str, Any], grids: list[Path]) -> None:
    """With tracking on: one MLflow run with the config, the report, the ranking and the review grids."""
    if not cfg.tracking.enabled:
        return
    from pipeline.tracking.tracker import Tracker

    tracker = Tracker(cfg, out, run_name=f"label-{out.resolve().name}", tags={"ssod.command": "label"})
    tracker.start()
    try:
        tracker.log_artifact(out / "review.json")
        for grid in grids:
            tracker.log_artifact(grid, "review")
    finally:
        tracker.finish(report, None)
