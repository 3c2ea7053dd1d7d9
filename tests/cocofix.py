"""Small real COCO fixtures written to disk: images of any mode/format and annotation files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import schema
from pipeline.data.prepare import prepare

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]
LABEL_OF = {3: 1, 7: 2, 12: 3}
SIZE = (40, 30)  # width, height


def pixels(mode: str, size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    """A random image in `mode` (RGB, L, LA, RGBA, P, CMYK or I;16)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    channels = {"L": 1, "LA": 2, "RGBA": 4}.get(mode, 3)
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    return img if img.mode == mode else img.convert(mode)


def save_image(path: Path, mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """Write a random image; mode "RGB;16" writes a 16-bit-per-channel RGB PNG (PIL reads it as "RGB")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB;16":
        path.write_bytes(_png48(size, seed))
    else:
        pixels(mode, size, seed).save(path, format=fmt)
    return path


def _png48(size: tuple[int, int], seed: int) -> bytes:
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 65536, (h, w * 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in arr)  # filter byte 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def truncate(path: Path) -> Path:
    """Keep only the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def image_entry(image_id: int, file_name: str, size: tuple[int, int] = SIZE) -> dict:
    return {"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]}


def ann(ann_id: int, image_id: int, bbox: list, category_id: int = 3, **extra: object) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict] = CATEGORIES) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def dataset(root: Path, annotated: int = 50, empty: int = 3, first_id: int = 1000) -> tuple[Path, Path, dict]:
    """`annotated` images with 1-2 boxes each plus `empty` without any; ids first_id, first_id+7, ...

    Every third image is a JPEG, the rest PNG. Returns (annotations file, images dir, COCO dict).
    """
    images_dir = root / "images"
    images, anns = [], []
    for i in range(annotated + empty):
        image_id = first_id + 7 * i
        ext, fmt = ("jpg", "JPEG") if i % 3 == 0 else ("png", "PNG")
        name = f"img_{image_id}.{ext}"
        save_image(images_dir / name, fmt=fmt, seed=i)
        images.append(image_entry(image_id, name))
        if i < annotated:
            cat = CATEGORIES[i % 3]["id"]
            anns.append(ann(10 * image_id, image_id, [1.5, 2.0, 10.0, 8.25], cat, segmentation=[[1, 2, 11, 2, 11, 10]]))
            if i % 2:
                anns.append(ann(10 * image_id + 1, image_id, [20, 5, 15, 20], 7))
    coco = {"images": images, "annotations": anns, "categories": CATEGORIES}
    path = root / "train.json"
    path.write_text(json.dumps(coco))
    return path, images_dir, coco


def rows(out: Path, split: str) -> list[dict]:
    table = pq.read_table(out / split)
    assert table.schema.equals(schema.ROW_SCHEMA)
    return table.to_pylist()


def run_one(tmp_path: Path, images: list[dict], anns: list[dict], **kwargs: object) -> tuple[dict, Path]:
    """prepare() on a hand-made COCO file at 100 %; returns (report, out dir)."""
    coco = write_coco(tmp_path / "train.json", images, anns)
    out = tmp_path / "out"
    return prepare(coco, tmp_path / "images", 100, 0, out, **kwargs), out
