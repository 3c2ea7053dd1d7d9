"""What a run reads, checked on the driver before a model is trained or Ray is started.

So the same bad input ends in the same one line on both backends: on Ray it would otherwise surface
minutes later inside a worker error. Damage to the unlabeled pool is not an error: shards whose footer
cannot be read are left out here and counted, damaged row groups when the readers meet them, and the run
goes on with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.weights_report import check, compare
from pipeline.config import Config, tracking_uri
from pipeline.data.readers import load_categories, load_split
from pipeline.data.rows import require_segmentations
from pipeline.data.schema import LABELED_DIR, SPLIT_FILE, UNLABELED_DIR, VAL_DIR
from pipeline.data.shards import RowGroup, Skipped, row_groups, whole_tables
from pipeline.errors import InputError
from pipeline.evaluation.evaluator import load_val_set
from pipeline.paths import writable_dir
from pipeline.training.checkpoints import load_checkpoint, load_part
from pipeline.training.setup import build_student_teacher


@dataclass
class RunInputs:
    """The checked prepared set: labeled rows, the unlabeled pool's row groups (from readable footers), what was skipped."""

    num_classes: int
    num_labeled: int
    pool: list[RowGroup] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)

    @property
    def pool_rows(self) -> int:
        return sum(g.rows for g in self.pool)


def check_run(cfg: Config) -> RunInputs:
    """Every input of `ssod train` that can be checked without training; InputError on the first problem."""
    prepared = Path(cfg.data.prepared)
    if not (prepared / SPLIT_FILE).is_file():
        raise InputError(f"{prepared}: data.prepared is not a prepared set (no {SPLIT_FILE}); run `ssod prepare`")
    split, num_classes = load_split(prepared), len(load_categories(prepared))
    inputs = RunInputs(num_classes, _check_labeled(prepared, split, num_classes))
    _check_pool(prepared, split, cfg, inputs)
    load_val_set(prepared)
    if not sum(table.num_rows for table in whole_tables(prepared / VAL_DIR)):
        raise InputError(f"{prepared / VAL_DIR}: the validation split is empty; nothing to score")
    if cfg.model.arch == "mask_rcnn":
        require_segmentations(prepared)
    if cfg.tracking.enabled:
        from pipeline.tracking.tracker import open_client  # MLflow is imported only by tracked runs

        open_client(tracking_uri(cfg.tracking.uri))
    writable_dir(cfg.train.output_dir, "train.output_dir")
    return inputs


def _check_labeled(prepared: Path, split: dict, num_classes: int) -> int:
    directory = prepared / LABELED_DIR
    ids, labels = [], set()
    for table in whole_tables(directory):  # read whole: a damaged labeled shard is named here
        ids += table.column("image_id").to_pylist()
        labels.update(label for row in table.column("labels").to_pylist() for label in row)
    if not ids:
        raise InputError(f"{directory}: the labeled split is empty (no rows in its shards); nothing to train on")
    outside = sorted(labels - set(range(1, num_classes + 1)))
    if outside:
        raise InputError(
            f"{directory}: label {outside[-1]} is outside 1..{num_classes} of categories.json; run `ssod prepare` again"
        )
    _same_ids(prepared, LABELED_DIR, split[LABELED_DIR], ids)
    return len(ids)


def _check_pool(prepared: Path, split: dict, cfg: Config, inputs: RunInputs) -> None:
    """Footers only: the pool may hold millions of rows, so its ids are counted, not read. A row group that
    turns out damaged when streamed is skipped and counted then, by the readers."""
    directory = prepared / UNLABELED_DIR
    inputs.pool, unreadable = row_groups(directory)
    for name, reason in unreadable.items():
        inputs.skipped.add(f"{name} (rows unknown)", 0, reason)
    folder = cfg.train.backend == "ray" and cfg.data.unlabeled_folder  # the local runner reads no folder
    if not inputs.pool_rows and not folder:
        damaged = " (every shard of it is corrupt)" if inputs.skipped.parts else ""
        raise InputError(
            f"{directory}: the unlabeled pool is empty{damaged}; mutual learning needs unlabeled "
            "images: prepare with a lower --percent or with --unlabeled-images"
        )
    listed = len(split[UNLABELED_DIR])
    if not unreadable and inputs.pool_rows != listed:
        raise InputError(
            f"{prepared / SPLIT_FILE}: it lists {listed} '{UNLABELED_DIR}' ids but the {UNLABELED_DIR} shards "
            f"hold {inputs.pool_rows} rows; run `ssod prepare` again"
        )


def _same_ids(prepared: Path, split_name: str, listed: list[int], found: list[int]) -> None:
    """split.json and the shards must name the same images."""
    extra, missing = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
    if extra or missing:
        raise InputError(
            f"{prepared / SPLIT_FILE}: its '{split_name}' ids and the {split_name} shards disagree "
            f"({len(missing)} listed but in no shard, {len(extra)} in a shard but not listed; first: "
            f"{(missing or extra)[0]}); run `ssod prepare` again"
        )


def check_model(cfg: Config, num_classes: int, checkpoint: Path | None) -> None:
    """Build the model once (weights files, pretrained caches) and fit the checkpoint a run would resume from.

    The local runner does both in-process before training; a Ray run does them here, not in its workers.
    """
    student, teacher = build_student_teacher(cfg, num_classes, torch.device("cpu"))
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        for name, model in (("student", student), ("teacher", teacher)):
            load_part(model, state, name, checkpoint)  # a resume loads all of it or nothing: one line if not
            if isinstance(state.get(name), dict):  # then counted and logged
                check(compare(model.state_dict(), state[name], f"{checkpoint} ({name})", name), False, "")
