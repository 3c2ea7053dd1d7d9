"""Bad data in a prepared set: what `ssod train` refuses before it starts (the same line on both backends),
and what a run skips and counts while it goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from badinput import copy_prepared, damage_row_group, edit_json, error_of, first_shard
from cocofix import ann, dataset, image_entry, save_image, truncate, write_coco
from conftest import tiny_config, train_briefly

from pipeline.data import schema
from pipeline.data.prepare import prepare
from pipeline.data.shards import Skipped
from pipeline.errors import InputError
from pipeline.preflight import check_run
from pipeline.train import train
from pipeline.training.divergence import SkipGuard
from pipeline.training.local import SampleStream, train_local


# -- ssod train: refused before it starts, the same line on both backends ---------------------------------
def _delete_labeled_shards(p: Path) -> None:
    for shard in (p / schema.LABELED_DIR).glob("*.parquet"):
        shard.unlink()


def _set_segmentation(p: Path, value: str) -> None:
    shard = first_shard(p / schema.LABELED_DIR)
    rows = pq.read_table(shard).to_pylist()
    rows[0]["segmentations"] = [value] * len(rows[0]["segmentations"])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.ROW_SCHEMA), shard)


REFUSED = {  # case -> (damage to a copy of the prepared set, extra overrides, what the one line says)
    "labeled_split_empty": (_delete_labeled_shards, [], "labeled: the labeled split is empty"),
    "unlabeled_shard_deleted": (
        lambda p: first_shard(p / "unlabeled").unlink(),
        [],
        "unlabeled: the unlabeled pool is empty",
    ),
    "unlabeled_shard_truncated": (
        lambda p: truncate(first_shard(p / "unlabeled")),
        [],
        "unlabeled: the unlabeled pool is empty (every shard of it is corrupt)",
    ),
    "corrupt_labeled_shard": (
        lambda p: damage_row_group(first_shard(p / "labeled")),
        [],
        "labeled/part-00000.parquet: corrupt Parquet shard (row group 0",
    ),
    "split_lists_ids_no_shard_holds": (
        lambda p: edit_json(p / "split.json", lambda s: s["labeled"].__setitem__(0, 999999)),
        [],
        "split.json: its 'labeled' ids and the labeled shards disagree (1 listed but in no shard, 1 in a shard "
        "but not listed; first: 999999)",
    ),
    "split_lists_fewer_unlabeled_ids_than_the_shards_hold": (
        lambda p: edit_json(
            p / "split.json", lambda s: s.update(num_unlabeled=len(s["unlabeled"]) - 1) or s["unlabeled"].pop()
        ),
        [],
        "'unlabeled' ids but the unlabeled shards hold",
    ),
    "val_annotations_missing": (
        lambda p: (p / schema.VAL_GT_FILE).unlink(),
        [],
        "val_annotations.json: no validation set",
    ),
    "val_annotations_malformed": (
        lambda p: (p / schema.VAL_GT_FILE).write_text('{"images": ['),
        [],
        "val_annotations.json: malformed JSON",
    ),
    "mask_rcnn_on_garbage_segmentation": (
        lambda p: _set_segmentation(p, '"garbage"'),
        ["model.arch=mask_rcnn"],
        "has a segmentation that is neither polygons nor an RLE",
    ),
    "labels_outside_categories": (
        lambda p: edit_json(p / "categories.json", lambda c: c.pop()),
        [],
        "labeled: label 8 is outside 1..7 of categories.json",
    ),
    "shard_of_another_schema": (
        lambda p: pq.write_table(pa.table({"image_id": [1]}), p / "labeled" / "x.parquet"),
        [],
        "x.parquet: not a shard of `ssod prepare` (no column file_name",
    ),
    "not_a_prepared_dir": (lambda p: (p / "split.json").unlink(), [], "data.prepared is not a prepared set"),
    "output_dir_is_a_file": (
        lambda p: (p / "a_file").write_text("x"),
        ["train.output_dir={p}/a_file"],
        "a_file: train.output_dir is an existing file",
    ),
}


@pytest.mark.parametrize("damage, overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_train_refuses_before_it_starts_on_both_backends(prepared, tmp_path, damage, overrides, message):
    broken = copy_prepared(prepared, tmp_path / "p")
    damage(broken)
    overrides = [o.format(p=broken) for o in overrides]
    lines = {
        backend: error_of(train, tiny_config(broken, tmp_path / backend, f"train.backend={backend}", *overrides))
        for backend in ("local", "ray")
    }
    assert lines["local"] == lines["ray"] and message in lines["local"]


def test_every_image_labeled_leaves_no_unlabeled_pool(tmp_path):
    path, images, _ = dataset(tmp_path / "coco", annotated=4, empty=0)
    prepare(path, images, 100, 0, tmp_path / "p", val_annotations=path, val_images=images)
    cfg = tiny_config(tmp_path / "p", tmp_path / "run", "train.backend=local")
    assert "the unlabeled pool is empty; mutual learning needs unlabeled images" in error_of(train, cfg)


@pytest.mark.slow
def test_split_file_without_counts_still_trains(prepared, tmp_path):
    broken = copy_prepared(prepared, tmp_path / "p")
    edit_json(broken / "split.json", lambda s: [s.pop(k) for k in ("num_labeled", "num_unlabeled", "num_val")])
    split = json.loads((broken / "split.json").read_text())
    inputs = check_run(tiny_config(broken, tmp_path / "ray", "train.backend=ray"))  # what a Ray run plans with
    assert inputs.num_labeled == len(split["labeled"]) and inputs.pool_rows == len(split["unlabeled"])
    metrics = train_briefly(broken, tmp_path / "run", "train.steps=3")  # 2 burn-in steps, 1 on pseudo-labels
    assert metrics["steps"] == 3 and metrics["stop_reason"] is None and metrics["pseudo_labeled_images"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


# -- ssod train: skipped and counted, the run goes on --------------------------------------------------------
@pytest.mark.slow  # trains end to end
def test_corrupt_unlabeled_rows_are_skipped_and_counted(prepared, tmp_path):
    broken = copy_prepared(prepared, tmp_path / "p")
    shard = first_shard(broken / "unlabeled")
    damage_row_group(shard)  # the preflight reads footers only: the run meets the damage
    metrics = train_local(tiny_config(broken, tmp_path / "run", "train.backend=local", "train.steps=6"))
    assert metrics["steps"] == 6 and metrics["stop_reason"] is None
    assert metrics["corrupt_rows_skipped"] == pq.ParquetFile(shard).metadata.row_group(0).num_rows
    assert metrics["corrupt_parts_skipped"] == ["unlabeled/part-00000.parquet row group 0"]


def test_undecodable_unlabeled_image_is_skipped_and_counted_but_a_labeled_one_is_refused(tmp_path):
    good = {
        "image_id": 1,
        "image": (save_image(tmp_path / "a.png")).read_bytes(),
        "boxes": [],
        "labels": [],
        "segmentations": [],
    }
    rows = [good, {**good, "image_id": 2, "image": b"not an image"}]
    skipped = Skipped()
    stream = SampleStream(rows, 0, False, 0.5, tmp_path / "unlabeled", skipped)
    assert {row["image_id"] for row, _, _ in stream.next(6)} == {1}
    assert skipped.metrics() == {"corrupt_rows_skipped": 1, "corrupt_parts_skipped": ["image 2"]}
    with pytest.raises(InputError, match="labeled: image 2 does not decode"):
        SampleStream(rows[1:], 0, False, 0.5, tmp_path / "labeled").next(1)


@pytest.mark.slow  # trains end to end
def test_run_whose_steps_are_mostly_skipped_stops_with_a_reason(prepared, tmp_path):
    cfg = tiny_config(
        prepared,
        tmp_path / "run",
        "train.backend=local",
        "train.lr=1e12",
        "train.grad_clip_norm=null",
        "train.warmup_steps=0",
        "train.skip_window=3",
        "train.steps=6",
        "ssl.burn_in_steps=6",
    )
    message = error_of(train, cfg)
    assert message.startswith("train.max_skipped_fraction=0.5: 2 of the last 3 steps were skipped")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["stop_reason"] == message and written["steps"] == 3


def test_skip_guard_judges_a_full_window_or_the_end_of_a_short_run():
    guard = SkipGuard(0.5, window=4)
    for skipped in (True, True, True):
        guard.add(skipped)
    assert guard.verdict(3, 0.01) is None and "3 of the last 3 steps" in guard.verdict(3, 0.01, final=True)
    guard.add(False)
    assert "3 of the last 4" in guard.verdict(4, 0.01)
    for _ in range(2):
        guard.add(False)
    assert guard.verdict(6, 0.01, final=True) is None  # 2 of the last 4: at most half


def test_input_error_inside_a_ray_worker_arrives_as_its_one_line():
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.errors import find_input_error

    # A Ray Data task's error inside a train worker's error: Ray's wrappers carry tracebacks as messages.
    cause = RayTaskError("labeled_views", "Traceback (most recent call last): ...", InputError("image 3: bad"))
    failed = WorkerGroupError("worker 0 failed", {0: UserExceptionWithTraceback(cause.as_instanceof_cause(), "tb")})
    assert str(find_input_error(failed)) == "image 3: bad"
    assert find_input_error(WorkerGroupError("oom", {0: MemoryError()})) is None


def test_a_decoder_warning_about_an_image_is_counted_not_printed(tmp_path):
    import struct
    import warnings
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    save_image(tmp_path / "images" / "a.png")
    header = struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)  # claims 10,000 x 10,000 RGB pixels
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    (tmp_path / "images" / "big.png").write_bytes(bomb)
    images = [image_entry(1, "a.png"), image_entry(2, "big.png")]
    coco = write_coco(tmp_path / "train.json", images, [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        report = prepare(coco, tmp_path / "images", 100, 0, tmp_path / "out")
    assert not [w for w in shown if "pixels" in str(w.message)], [str(w.message) for w in shown]
    assert report["corrupt_images"] == 1 and report["image_warnings"] == 1
    [example] = report["examples"]["image_warnings"]
    assert example.startswith("big.png: DecompressionBombWarning: Image size (100000000 pixels) exceeds limit")
