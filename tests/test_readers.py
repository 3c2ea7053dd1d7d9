"""Ray Data readers against a real local Ray: prepared Parquet splits and raw image folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from cocofix import dataset, save_image, truncate
from PIL import Image

from pipeline.data import schema
from pipeline.data.prepare import prepare
from pipeline.data.readers import load_categories, load_split, read_image_folder, read_prepared
from pipeline.errors import InputError

pytestmark = pytest.mark.slow  # a real local Ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on otherwise
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coco")
    path, images, _ = dataset(root, annotated=20, empty=2)
    prepare(path, images, 25, 0, root / "out", shard_rows=4)
    return root / "out", images


def test_read_prepared_rows_and_bytes(prepared):
    out, images = prepared
    labeled = read_prepared(out, schema.LABELED_DIR, override_num_blocks=2).take_all()
    split = load_split(out)
    assert sorted(r["image_id"] for r in labeled) == split["labeled"] and len(labeled) == 5
    for row in labeled:
        assert row["image"] == (images / row["file_name"]).read_bytes()
        assert len(row["boxes"]) == len(row["labels"]) >= 1
    assert read_prepared(str(out), schema.UNLABELED_DIR).count() == 17


def test_read_prepared_with_explicit_filesystem_and_uri(prepared):
    out, _ = prepared
    ds = read_prepared(str(out), schema.LABELED_DIR, filesystem=pafs.LocalFileSystem())
    assert ds.count() == 5
    assert read_prepared(f"file://{out}", schema.LABELED_DIR).count() == 5


def test_read_prepared_bad_split_or_dir(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(InputError, match="unknown split"):
        read_prepared(out, "train")
    with pytest.raises(InputError, match="no 'val' split"):
        read_prepared(out, schema.VAL_DIR)
    with pytest.raises(InputError, match="no 'labeled' split"):
        read_prepared(tmp_path / "missing", schema.LABELED_DIR)


def test_read_image_folder(tmp_path):
    folder = tmp_path / "raw"
    save_image(folder / "b.jpg", fmt="JPEG", size=(16, 12))
    save_image(folder / "a.png", size=(20, 10))
    save_image(folder / "sub" / "c.png", mode="L", size=(8, 8))
    truncate(save_image(folder / "d.png"))
    (folder / "readme.txt").write_text("skip me")
    rows = sorted(read_image_folder(folder, start_id=500).take_all(), key=lambda r: r["image_id"])
    got = [(r["image_id"], r["file_name"], r["width"], r["height"], r["annotated"]) for r in rows]
    # ids follow the sorted paths, so the dropped (truncated) d.png still used up 502
    assert got == [(500, "a.png", 20, 10, False), (501, "b.jpg", 16, 12, False), (503, "sub/c.png", 8, 8, False)]
    assert rows[0]["image"] == (folder / "a.png").read_bytes()
    assert Image.open(io.BytesIO(rows[2]["image"])).mode == "RGB"
    assert rows[0]["boxes"] == [] and rows[0]["labels"] == [] and rows[0]["segmentations"] == []


def test_read_image_folder_schema_matches_prepared(prepared, tmp_path):
    out, images = prepared
    raw = read_image_folder(images, filesystem=pafs.LocalFileSystem())
    assert raw.schema().base_schema.equals(schema.ROW_SCHEMA)
    assert raw.union(read_prepared(out, schema.LABELED_DIR)).count() == 22 + 5


def test_read_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="image folder not found"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        read_image_folder(tmp_path / "empty")


def test_json_loaders(prepared, tmp_path):
    out, _ = prepared
    assert [c["label"] for c in load_categories(out)] == [1, 2, 3]
    assert load_split(out)["num_labeled"] == 5
    (tmp_path / schema.SPLIT_FILE).write_text("{oops")
    with pytest.raises(InputError, match="split.json: malformed JSON at line 1"):
        load_split(tmp_path)
    (tmp_path / schema.CATEGORIES_FILE).write_text(json.dumps({"id": 1}))
    with pytest.raises(InputError, match="not a categories file"):
        load_categories(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_split(tmp_path / "nowhere")
