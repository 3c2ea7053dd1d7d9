"""Ray Data readers for `ssod prepare` output and for plain image folders, plus its small JSON files.

Both readers yield rows of `schema.ROW_SCHEMA`, so labeled, unlabeled, val and raw-folder datasets
can be mixed freely. Paths may be local paths or any URI pyarrow understands (or pass `filesystem`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data import schema
from pipeline.data.coco_io import read_json
from pipeline.data.image_files import DECODE_ERRORS, IMAGE_EXTENSIONS, inspect_bytes, to_rgb_png
from pipeline.errors import InputError

if TYPE_CHECKING:
    import ray.data

SPLITS = (schema.LABELED_DIR, schema.UNLABELED_DIR, schema.VAL_DIR)
FOLDER_BATCH_ROWS = 16
log = logging.getLogger(__name__)


def read_prepared(
    prepared_dir: str | os.PathLike,
    split: str,
    *,
    override_num_blocks: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> ray.data.Dataset:
    """The Parquet shards of one prepared split ("labeled", "unlabeled" or "val") as a Ray Dataset."""
    import ray.data

    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    fs, root = _resolve(prepared_dir, filesystem)
    path = f"{root.rstrip('/')}/{split}"
    _require_dir(fs, path, f"{prepared_dir} has no '{split}' split (run `ssod prepare` first)")
    return ray.data.read_parquet(path, filesystem=fs, override_num_blocks=override_num_blocks)


@dataclass(frozen=True)
class ImageFolder:
    """The image files under a folder (recursive, sorted paths) and the filesystem they are on."""

    fs: pafs.FileSystem
    root: str
    files: list[str]

    def file_name(self, path: str) -> str:
        """A file's path relative to the folder: the rows' `file_name`."""
        return _relative(path, self.root)


def list_image_folder(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> ImageFolder:
    fs, root = _resolve(path, filesystem)
    _require_dir(fs, root, f"{path}: image folder not found")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(fs, root, files)


def read_image_folder(
    path: str | os.PathLike | ImageFolder, *, filesystem: pafs.FileSystem | None = None, start_id: int = 10**9
) -> ray.data.Dataset:
    """Raw images under `path` (recursive) as unannotated rows; ids follow the sorted paths from start_id.

    Undecodable files are dropped (logged); images that are not 8-bit RGB JPEG/PNG are re-encoded as
    RGB PNG, as `ssod prepare` does. An `ImageFolder` already listed is not listed again.
    """
    import ray.data

    folder = path if isinstance(path, ImageFolder) else list_image_folder(path, filesystem)
    ids = {p: start_id + i for i, p in enumerate(folder.files)}
    return ray.data.read_binary_files(folder.files, include_paths=True, filesystem=folder.fs).map_batches(
        _folder_rows, batch_format="pyarrow", batch_size=FOLDER_BATCH_ROWS, fn_kwargs={"root": folder.root, "ids": ids}
    )


def _resolve(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    path = os.fspath(path)
    if filesystem is not None:
        return filesystem, path
    return pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


def _require_dir(fs: pafs.FileSystem, path: str, message: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise InputError(message)


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/")


def _folder_rows(batch: pa.Table, root: str, ids: dict[str, int]) -> pa.Table:
    rows = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        try:
            width, height, convert = inspect_bytes(data)
        except DECODE_ERRORS:
            log.warning("skipping undecodable image %s", path)
            continue
        rows.append(
            {
                "image_id": ids[path],
                "file_name": _relative(path, root),
                "width": width,
                "height": height,
                "image": to_rgb_png(data) if convert else data,
                "boxes": [],
                "labels": [],
                "segmentations": [],
                "annotated": False,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.ROW_SCHEMA)


def load_split(prepared_dir: str | Path) -> dict:
    """split.json of a prepared directory: percent, seed, labeled/unlabeled COCO image ids, counts."""
    path = Path(prepared_dir) / schema.SPLIT_FILE
    split = read_json(path)
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("labeled", "unlabeled")):
        raise InputError(f"{path}: not a split file (needs 'labeled' and 'unlabeled' id lists)")
    for key in ("labeled", "unlabeled"):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in split[key]):
            raise InputError(f"{path}: '{key}' must list integer COCO image ids")
        count = split.setdefault(f"num_{key}", len(split[key]))  # the counts are derived: older files lack them
        if count != len(split[key]):
            raise InputError(f"{path}: num_{key} is {count!r} but '{key}' lists {len(split[key])} ids")
    return split


def load_categories(prepared_dir: str | Path) -> list[dict]:
    """categories.json of a prepared directory: [{"id": coco id, "name", "label": 1..K}, ...]."""
    path = Path(prepared_dir) / schema.CATEGORIES_FILE
    categories = read_json(path)
    keys = {"id", "name", "label"}
    if not isinstance(categories, list) or not all(isinstance(c, dict) and keys <= c.keys() for c in categories):
        raise InputError(f"{path}: not a categories file (needs a list of {{id, name, label}} objects)")
    return categories
