"""Score a detector on the prepared validation split with pycocotools."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.ema import unwrap
from pipeline.config import Config
from pipeline.data.augment import to_float
from pipeline.data.coco_io import load_coco
from pipeline.data.readers import load_categories
from pipeline.data.rows import decode_image_bytes, read_rows
from pipeline.data.schema import VAL_DIR, VAL_GT_FILE
from pipeline.errors import InputError
from pipeline.evaluation.scoring import score_coco, to_coco_results


class Evaluator:
    """Holds the decoded validation images and their COCO ground truth; call it with a model."""

    def __init__(
        self,
        prepared: str | Path,
        label_to_category: dict[int, int],
        with_masks: bool,
        max_images: int | None = None,
        batch_size: int = 8,
    ):
        gt = load_val_set(prepared)
        rows = read_rows(Path(prepared) / VAL_DIR, columns=["image_id", "image"])[:max_images]
        self.image_ids = [r["image_id"] for r in rows]
        self.images = [decode_image_bytes(r["image"]) for r in rows]
        self.gt = _restrict(gt, set(self.image_ids))
        self.label_to_category = label_to_category
        self.iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: Config) -> "Evaluator":
        """The validation split of `cfg.data.prepared`, scored for what `cfg.model.arch` predicts."""
        categories = load_categories(cfg.data.prepared)
        return cls(
            cfg.data.prepared,
            {c["label"]: c["id"] for c in categories},
            cfg.model.arch == "mask_rcnn",
            max_images=cfg.data.eval_images,
        )

    def __call__(self, model: nn.Module, device: torch.device) -> dict:
        model = unwrap(model)
        was_training = model.training
        model.eval()
        results = []
        with torch.inference_mode():
            for start in range(0, len(self.images), self.batch_size):
                batch = [to_float(i).to(device) for i in self.images[start : start + self.batch_size]]
                # Encoded per batch: full-image float masks of every detection of every image would
                # take gigabytes (200 images x 100 detections x H x W).
                outputs = [{k: v.cpu() for k, v in o.items()} for o in model(batch)]
                results += to_coco_results(self.image_ids[start : start + len(batch)], outputs, self.label_to_category)
        model.train(was_training)
        return score_coco(self.gt, results, self.iou_types)


def load_val_set(prepared: str | Path) -> dict:
    """The validation ground truth (COCO); a prepared set without one cannot be scored."""
    gt_path = Path(prepared) / VAL_GT_FILE
    if not gt_path.exists():
        raise InputError(f"{gt_path}: no validation set; run `ssod prepare` with --val-annotations")
    return load_coco(gt_path)


def _restrict(gt: dict, image_ids: set[int]) -> dict:
    return {
        **gt,
        "images": [i for i in gt["images"] if i["id"] in image_ids],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids],
    }
