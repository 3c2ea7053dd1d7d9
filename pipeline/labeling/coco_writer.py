"""A COCO file written as images arrive: entries go to two line files, `close` joins them into one JSON.

Memory stays flat whatever the number of images; the result loads with pycocotools `COCO()` and the
COCO importers of CVAT and Label Studio (bbox `[x, y, w, h]`, `area`, `iscrowd` 0, RLE masks with
`counts` as a string, plus the teacher's `score`, which those importers ignore).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import IO

import numpy as np
from pycocotools import mask as mask_utils


class CocoWriter:
    def __init__(self, path: Path, categories: list[dict], info: dict):
        self.path, self.categories, self.info = path, categories, info
        self._parts = {key: path.with_name(f".{path.name}.{key}") for key in ("images", "annotations")}
        self._files: dict[str, IO[str]] = {key: p.open("w") for key, p in self._parts.items()}
        self._count = {"images": 0, "annotations": 0}

    def add(self, image: dict, annotations: list[dict]) -> None:
        """One image entry and its annotations; annotation ids are given here, 1, 2, ... in file order."""
        self._write("images", image)
        for ann in annotations:
            self._write("annotations", {"id": self._count["annotations"] + 1, "image_id": image["id"], **ann})

    def _write(self, key: str, entry: dict) -> None:
        if self._count[key]:
            self._files[key].write(",\n")
        self._files[key].write(json.dumps(entry))
        self._count[key] += 1

    def close(self) -> dict[str, int]:
        """Write the COCO file (atomically) and drop the line files; returns the entry counts."""
        for f in self._files.values():
            f.close()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as out:
            out.write(f'{{"info": {json.dumps(self.info)},\n"categories": {json.dumps(self.categories)},\n')
            for i, (key, part) in enumerate(self._parts.items()):
                out.write(f'"{key}": [\n')
                with part.open() as f:
                    shutil.copyfileobj(f, out)
                out.write("\n]" + (",\n" if i == 0 else "}\n"))
        tmp.replace(self.path)
        self.discard()
        return dict(self._count)

    def discard(self) -> None:
        for key, part in self._parts.items():
            self._files[key].close()
            part.unlink(missing_ok=True)


def annotations(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, masks: list[str] | None, category_of: dict[int, int]
) -> list[dict]:
    """Kept detections (XYXY boxes, model labels, scores, labeler RLE strings) -> COCO annotations without ids.

    `area` is the mask's area when there is a mask (COCO's convention), else the box's.
    """
    out = []
    for i, (box, label, score) in enumerate(zip(boxes.reshape(-1, 4).tolist(), labels.tolist(), scores.tolist())):
        x0, y0, x1, y1 = box
        ann = {
            "category_id": category_of[int(label)],
            "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            "area": round((x1 - x0) * (y1 - y0), 2),
            "iscrowd": 0,
            "score": round(float(score), 4),
            "segmentation": [],
        }
        if masks is not None:
            rle = json.loads(masks[i])
            ann["segmentation"], ann["area"] = rle, float(mask_utils.area({**rle, "counts": rle["counts"].encode()}))
        out.append(ann)
    return out
