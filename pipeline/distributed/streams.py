"""The two Ray Data streams of a Ray run: labeled views, and the unlabeled pool through the teacher labelers.

Both are read row group by row group (one task per shard), as their shards' footers list them. In the
unlabeled pool a row group that turns out damaged is skipped and counted in the weight store
instead of failing the run; the labelers count undecodable images the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.data import ActorPoolStrategy, ExecutionOptions, ExecutionResources

from pipeline.config import Config
from pipeline.data.readers import read_image_folder
from pipeline.data.shards import READ_ERRORS, RowGroup, error_reason, read_group, read_whole_group, row_groups
from pipeline.distributed.labeler import TeacherLabeler, add_strong_views, labeled_views
from pipeline.distributed.resources import VIEW_TASK_CPUS, ResourcePlan, data_context
from pipeline.errors import InputError
from pipeline.preflight import RunInputs
from pipeline.training.pseudo import pseudo_label_policy

LABELED, UNLABELED = "labeled", "unlabeled"
MAX_LABELED_PASSES = 64  # beyond this a long run re-executes the labeled stream per 64 passes
READ_TASK_CPUS = 1.0  # as a Parquet read task, which resources.py budgets for


def _unlabeled_passes(cfg: Config, pool_size: int) -> int:
    """Passes over the pool so no worker runs dry (a ragged epoch boundary would stall DDP)."""
    rows_needed = max(cfg.train.steps - cfg.ssl.burn_in_steps, 0) * cfg.train.batch_size_unlabeled * cfg.ray.num_workers
    return math.ceil(1.5 * rows_needed / max(pool_size, 1)) + 1


def _labeled_passes(cfg: Config, num_labeled: int) -> int:
    """Passes over the labeled set in one execution (at most MAX_LABELED_PASSES).

    Each new execution asks Ray Data's autoscaling coordinator for CPUs afresh; while the unlabeled
    stream runs, a second labeled epoch is granted none ("1/0 CPU") and mutual learning stalls.
    """
    rows_needed = cfg.train.steps * cfg.train.batch_size_labeled * cfg.ray.num_workers
    return min(math.ceil(rows_needed / max(num_labeled, 1)) + 1, MAX_LABELED_PASSES)


def _passes(dataset: ray.data.Dataset, n: int) -> ray.data.Dataset:
    """`n` passes over `dataset` as one streaming execution."""
    return dataset.union(*[dataset] * (n - 1)) if n > 1 else dataset


def build_datasets(cfg: Config, inputs: RunInputs, weights_store: str) -> dict[str, ray.data.Dataset]:
    r = cfg.ray
    if inputs.num_labeled < r.num_workers:
        raise InputError(f"{inputs.num_labeled} labeled images cannot be split over ray.num_workers={r.num_workers}")
    labeled_groups, _ = row_groups(Path(cfg.data.prepared) / LABELED)  # whole: the preflight read every one
    # The streams' progress bars, relayed through the driver, would be thousands of console lines per step.
    with data_context(enable_progress_bars=False):
        labeled = read_row_groups(labeled_groups, _labeled_passes(cfg, inputs.num_labeled)).map_batches(
            labeled_views,
            batch_size=cfg.train.batch_size_labeled,
            num_cpus=VIEW_TASK_CPUS,
            fn_kwargs={
                "with_masks": cfg.model.arch == "mask_rcnn",
                "flip_prob": cfg.data.flip_prob,
                "where": str(Path(cfg.data.prepared) / LABELED),
            },
        )
        with _block_size(_labeler_batch_bytes(cfg, inputs.pool)):
            unlabeled = _unlabeled_stream(cfg, inputs, weights_store)
    return {LABELED: labeled, UNLABELED: unlabeled}


def _block_size(max_bytes: int) -> contextlib.AbstractContextManager:
    """Datasets built inside get blocks of about `max_bytes`.

    Ray Data backpressures in blocks, so block size is the staleness knob: a read block of the whole
    shard (Parquet V2 ignores `override_num_blocks`) would be labelled in one task whose output only
    appears at its end, while the credit gate holds the labeler back.
    """
    return data_context(target_max_block_size=max_bytes)


def _labeler_batch_bytes(cfg: Config, pool: list[RowGroup]) -> int:
    """Encoded bytes of one labeler batch, from the shards' size on disk."""
    files = {g.path for g in pool}
    per_row = sum(Path(f).stat().st_size for f in files) / max(sum(g.rows for g in pool), 1)
    return max(int(per_row * cfg.ray.labeler_batch_size), 1024)


def read_row_groups(groups: list[RowGroup], passes: int = 1, weights_store: str | None = None) -> ray.data.Dataset:
    """`passes` passes over `groups` as rows of `schema.ROW_SCHEMA`, one read task per shard and pass, all of
    them in one read operator (see `_unlabeled_stream`).

    With a `weights_store` (the unlabeled pool) a damaged row group is skipped and counted there; without
    one (the labeled split, which must be whole) it is an InputError naming the shard.
    """
    by_shard: dict[str, list[RowGroup]] = defaultdict(list)
    for group in groups:
        by_shard[group.path].append(group)
    items = [
        {"path": path, "row_groups": [g.index for g in groups], "rows": [g.rows for g in groups]}
        for path, groups in by_shard.items()
    ] * passes
    return ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
        _read_shard, batch_size=1, num_cpus=READ_TASK_CPUS, fn_kwargs={"weights_store": weights_store}
    )


def _read_shard(batch: dict[str, np.ndarray], weights_store: str | None) -> Iterator[pa.Table]:
    for path, indices, rows in zip(batch["path"], batch["row_groups"], batch["rows"]):
        for index, count in zip(indices, rows):
            group = RowGroup(str(path), int(index), int(count))
            if weights_store is None:
                yield read_whole_group(group)
                continue
            try:
                yield read_group(group)
            except READ_ERRORS as exc:
                ray.get_actor(weights_store).skip.remote(group.name, group.rows, error_reason(exc))


def _unlabeled_stream(cfg: Config, inputs: RunInputs, weights_store: str) -> ray.data.Dataset:
    r = cfg.ray
    folder = read_image_folder(cfg.data.unlabeled_folder) if cfg.data.unlabeled_folder else None
    passes = _unlabeled_passes(cfg, inputs.pool_rows + (folder.count() if folder is not None else 0))
    # The shards' passes are one read operator, not a union of passes: Ray Data reserves each read operator a
    # whole read CPU of the stream's budget (resources.py), so two passes would take all of it and the strong
    # views would run only once both had read the whole pool (minutes for 10k images).
    parts = [read_row_groups(inputs.pool, passes, weights_store)] if inputs.pool else []
    if folder is not None:  # the preflight refused a run with neither
        parts.append(_passes(folder, passes))
    pool = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return pool.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={
            "config": cfg.model_dump(),
            "num_classes": inputs.num_classes,
            "store_name": weights_store,
            "policy": pseudo_label_policy(cfg, inputs.num_classes),
        },
        compute=ActorPoolStrategy(size=r.num_labelers, max_tasks_in_flight_per_actor=1),
        batch_size=r.labeler_batch_size,
        num_cpus=r.cpus_per_labeler,
        num_gpus=r.gpus_per_labeler,
    ).map_batches(add_strong_views, batch_size=r.labeler_batch_size, num_cpus=VIEW_TASK_CPUS)


def data_config(plan: ResourcePlan) -> ray.train.DataConfig:
    """A budget per stream: with one shared limit the labeled stream reserved it all (see resources.py)."""

    def options(cpus: float) -> ExecutionOptions:
        return ExecutionOptions(resource_limits=ExecutionResources(cpu=cpus, object_store_memory=512 * 1024**2))

    return ray.train.DataConfig(
        execution_options={LABELED: options(plan.labeled_budget_cpus), UNLABELED: options(plan.unlabeled_budget_cpus)}
    )
