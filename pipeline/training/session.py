"""What both runners (local and Ray) share: models, optimizer, views, statistics, checkpoints, metrics."""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from models.builders import WeightsFileError, build_detector
from models.ema import unwrap
from models.pretrained import PretrainedWeightsError
from models.pseudo_labels import DensityPrior, PseudoLabelPolicy
from models.torch_files import read_tensor_file
from models.unbiased_teacher import Batch
from pipeline.config import Config
from pipeline.data.augment import to_float
from pipeline.data.schema import LABELED_DIR
from pipeline.errors import InputError
from pipeline.paths import output_errors

CHECKPOINT_NAME = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device={name}: CUDA is not available on this machine")
    if name == "cpu":
        torch.set_flush_denormal(True)  # denormals made single CPU steps 10-30x slower (measured on these machines)
    return torch.device(name)


def build_student_teacher(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(cfg.train.seed)
    try:
        student = build_detector(num_classes, **cfg.model.model_dump()).to(device)
    except WeightsFileError as exc:
        raise InputError(f"model.weights_path: {exc}") from None
    except PretrainedWeightsError as exc:
        raise InputError(str(exc)) from None
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return student, teacher


def build_optimizer(
    cfg: Config, student: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with linear warm-up, as Detectron2 and torchvision's detection references do."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    warmup = max(cfg.train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    return optimizer, scheduler


def labeled_batch(samples: list[tuple[Tensor, Tensor, dict[str, Tensor]]]) -> Batch:
    """(weak view, strong view, target) triples -> both views of every image, as the reference trains them."""
    images = [to_float(weak) for weak, _, _ in samples] + [to_float(strong) for _, strong, _ in samples]
    targets = [target for _, _, target in samples]
    return Batch(images, targets + targets)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        [i.to(device, non_blocking=True) for i in batch.images],
        [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch.targets],
    )


@dataclass
class PseudoLabelStats:
    """Pseudo-label counts per class, and their precision/recall against held-aside labels (IoU 0.5)."""

    images: int = 0
    boxes: int = 0
    per_class: Counter = field(default_factory=Counter)
    matched: int = 0
    gt_boxes: int = 0
    scored_boxes: int = 0
    staleness_max: int | None = None
    staleness_sum: int = 0
    staleness_rows: int = 0

    def add(self, pseudo: dict[str, Tensor], held_aside: dict[str, Tensor] | None) -> None:
        self.images += 1
        self.boxes += len(pseudo["labels"])
        self.per_class.update(pseudo["labels"].tolist())
        if held_aside is not None:
            self.gt_boxes += len(held_aside["labels"])
            self.scored_boxes += len(pseudo["labels"])
            self.matched += _true_positives(pseudo, held_aside)

    def add_staleness(self, steps: int) -> None:
        """Student step minus the step of the teacher that labelled the row (running, O(1) memory)."""
        self.staleness_max = steps if self.staleness_max is None else max(self.staleness_max, steps)
        self.staleness_sum += steps
        self.staleness_rows += 1

    def summary(self, names: dict[int, str]) -> dict[str, Any]:
        out = {
            "pseudo_labels_per_image": self.boxes / max(self.images, 1),
            "pseudo_labeled_images": self.images,
            "pseudo_label_class_counts": {names[k]: self.per_class.get(k, 0) for k in sorted(names)},
            "pseudo_label_precision": self.matched / self.scored_boxes if self.scored_boxes else None,
            "pseudo_label_recall": self.matched / self.gt_boxes if self.gt_boxes else None,
        }
        if self.staleness_rows:
            out["staleness_max"] = self.staleness_max
            out["staleness_mean"] = self.staleness_sum / self.staleness_rows
        return out

    def since(self, earlier: dict[str, Any]) -> dict[str, float | None]:
        """Boxes per image, precision and recall of the pseudo-labels counted after the `earlier` state."""
        images, boxes = self.images - earlier["images"], self.boxes - earlier["boxes"]
        matched = self.matched - earlier["matched"]
        scored, gt = self.scored_boxes - earlier["scored_boxes"], self.gt_boxes - earlier["gt_boxes"]
        return {
            "pseudo_labels_per_image": boxes / images if images else None,
            "pseudo_label_precision": matched / scored if scored else None,
            "pseudo_label_recall": matched / gt if gt else None,
        }

    def state(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "boxes": self.boxes,
            "per_class": dict(self.per_class),
            "matched": self.matched,
            "gt_boxes": self.gt_boxes,
            "scored_boxes": self.scored_boxes,
            "staleness_max": self.staleness_max,
            "staleness_sum": self.staleness_sum,
            "staleness_rows": self.staleness_rows,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "PseudoLabelStats":
        return cls(**{**state, "per_class": Counter({int(k): v for k, v in state["per_class"].items()})})


def _true_positives(pseudo: dict[str, Tensor], gt: dict[str, Tensor]) -> int:
    """Greedy one-to-one matching by score at IoU >= 0.5 with the same class."""
    if len(pseudo["boxes"]) == 0 or len(gt["boxes"]) == 0:
        return 0
    iou = box_iou(pseudo["boxes"].cpu(), gt["boxes"].cpu())
    iou[pseudo["labels"].cpu()[:, None] != gt["labels"].cpu()[None, :]] = 0.0
    used, hits = set(), 0
    for row in iou:
        candidates = [(v, j) for j, v in enumerate(row.tolist()) if v >= 0.5 and j not in used]
        if candidates:
            used.add(max(candidates)[1])
            hits += 1
    return hits


def labeled_class_histogram(prepared: str | Path, names: dict[int, str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for f in sorted((Path(prepared) / LABELED_DIR).glob("*.parquet")):
        for labels in pq.read_table(f, columns=["labels"]).column("labels").to_pylist():
            counts.update(labels)
    return {names[k]: counts.get(k, 0) for k in sorted(names)}


def labeled_boxes_per_image(prepared: str | Path, num_classes: int) -> torch.Tensor:
    """Mean labeled boxes per image of each model label (index 0, background, stays 0): the density prior."""
    import pyarrow.parquet as pq

    counts, images = torch.zeros(num_classes + 1), 0
    for f in sorted((Path(prepared) / LABELED_DIR).glob("*.parquet")):
        for labels in pq.read_table(f, columns=["labels"]).column("labels").to_pylist():
            counts += torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes + 1).float()
            images += 1
    return counts / max(images, 1)


def pseudo_label_policy(cfg: Config, num_classes: int) -> PseudoLabelPolicy:
    """The `ssl.*` remedies as one policy, the same on both runners."""
    ssl = cfg.ssl
    prior = None
    if ssl.density_prior is not None:
        per_class = labeled_boxes_per_image(cfg.data.prepared, num_classes)
        prior = DensityPrior(per_class, ssl.density_prior, ssl.density_floor, ssl.density_min_score)
    return PseudoLabelPolicy(ssl.teacher_tta, ssl.unsup_background_weight == "teacher", prior)


def checkpoint_state(
    student: nn.Module, teacher: nn.Module, optimizer, scheduler, step: int, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        **extra,
    }


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / CHECKPOINT_NAME
    with output_errors(path, "the checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of `ssod train` (student, teacher, optimizer, scheduler, step, ...)."""
    state = read_tensor_file(path, InputError, "checkpoint", "not a readable checkpoint: ")
    if not isinstance(state, dict) or not {"student", "teacher", "step"} <= state.keys():
        raise InputError(f"{path}: not a checkpoint of `ssod train` (needs student, teacher and step)")
    return state


def load_part(target: Any, state: dict[str, Any], key: str, path: str | Path) -> None:
    """`target.load_state_dict(state[key])` (a model, optimizer or scheduler), a mismatch named in one line."""
    try:
        target.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:160]
        raise InputError(
            f"{path}: its {key} does not fit this config (another model.arch, model.backbone or "
            f"set of classes?): {detail}"
        ) from None


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(run_dir) / "metrics.json"
    with output_errors(path, "metrics"):
        path.write_text(json.dumps(metrics, indent=2))
    return path
