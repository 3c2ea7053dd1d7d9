"""What a teacher's pseudo-labels get wrong: its kept boxes on validation images, sorted into kinds.

    python bench/confusion.py RUN_DIR [RUN_DIR ...] [--tta flip] [--threshold 0.8] [--cut-score foreground]
        [--skip 200 --images 200]

For each run directory (its newest checkpoint's teacher and config.yaml), labels `--images` validation
images (after the first `--skip`, which the run evaluated on) the way training does, keeps the boxes at
`--threshold` (on the top class's score, or with `--cut-score foreground` on the teacher's foreground
probability, as `ssl.cut_score` does), and matches them to the validation labels one-to-one by score: a hit (IoU >= 0.5, same
class), a box on an object of another class (IoU >= 0.5), a poor box (IoU 0.1-0.5, or a second box on an
object already hit), or background. Prints, per teacher, the share of each kind, each class's hits, misses
and recall, and the commonest confusions.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torchvision.ops import box_iou

from models.builders import build_detector
from models.pseudo_labels import CUT_SCORES, filter_detections, teacher_detections
from pipeline.data.augment import to_float
from pipeline.data.rows import decode_image_bytes, read_rows
from pipeline.data.schema import VAL_DIR
from pipeline.evaluation.evaluator import load_val_set
from pipeline.labeling.model import from_checkpoint
from pipeline.training.pseudo_stats import match_boxes

KINDS = ("hit", "other class", "poor box", "background")


def _val_targets(prepared: str, label_of: dict[int, int]) -> dict[int, dict[str, torch.Tensor]]:
    boxes: dict[int, list] = {}
    for a in load_val_set(prepared)["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], label_of[a["category_id"]]))
    return {
        image: {"boxes": torch.tensor([b for b, _ in pairs]), "labels": torch.tensor([c for _, c in pairs])}
        for image, pairs in boxes.items()
    }


def _kinds(kept: dict[str, torch.Tensor], truth: dict[str, torch.Tensor] | None, tally: dict) -> None:
    """Sort one image's kept boxes (by score, as they come) into KINDS; count per class and per confusion."""
    if truth is None:
        truth = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    tally["truth"].update(truth["labels"].tolist())
    hits, others = match_boxes(kept, truth)  # the matching training's pseudo-label figures use
    overlap = box_iou(kept["boxes"], truth["boxes"].float()).amax(dim=1) if len(truth["boxes"]) else None
    for i, label in enumerate(kept["labels"].tolist()):
        if hits[i] >= 0:
            kind = "hit"
        elif others[i] >= 0:
            kind = "other class"
            tally["confusions"][(label, int(truth["labels"][others[i]]))] += 1
        else:
            kind = "poor box" if overlap is not None and overlap[i] >= 0.1 else "background"
        tally["kinds"][kind] += 1
        tally["per_class"][(label, kind == "hit")] += 1


def report(run_dir: Path, args: argparse.Namespace) -> None:
    model = from_checkpoint(run_dir, None, [], "teacher")
    teacher = build_detector(len(model.categories), **{**model.cfg.model.model_dump(), "init_weights": False})
    teacher.load_state_dict(model.state)
    names = model.names
    truths = _val_targets(model.cfg.data.prepared, {c["id"]: c["label"] for c in model.categories})
    rows = read_rows(Path(model.cfg.data.prepared) / VAL_DIR, columns=["image_id", "image"])
    rows = rows[args.skip : args.skip + args.images]
    tally = {"kinds": Counter(), "per_class": Counter(), "truth": Counter(), "confusions": Counter()}
    foreground = args.cut_score == "foreground"  # the foreground probability comes with the class distribution
    for start in range(0, len(rows), 4):
        batch = rows[start : start + 4]
        images = [to_float(decode_image_bytes(r["image"])) for r in batch]
        for row, detections in zip(batch, teacher_detections(teacher, images, args.tta, class_probs=foreground)):
            kept = filter_detections(detections, args.threshold, cut_score=args.cut_score)
            _kinds(kept, truths.get(row["image_id"]), tally)
    kept = sum(tally["kinds"].values())
    print(f"{model.source}: {len(rows)} images, cut {args.threshold} on {args.cut_score} score, tta {args.tta}")
    shares = "  ".join(f"{k} {tally['kinds'][k] / max(kept, 1):.3f}" for k in KINDS)
    print(
        f"  kept {kept / max(len(rows), 1):.2f} per image (true {sum(tally['truth'].values()) / len(rows):.2f}): {shares}"
    )
    for label, name in names.items():
        hits, misses, truth = (
            tally["per_class"][(label, True)],
            tally["per_class"][(label, False)],
            tally["truth"][label],
        )
        print(f"  {name:10s} hits {hits:4d}  wrong {misses:4d}  objects {truth:4d}  recall {hits / max(truth, 1):.2f}")
    confusions = ", ".join(f"{names[p]} on {names[t]} {n}" for (p, t), n in tally["confusions"].most_common(4))
    print(f"  commonest confusions (kept class on true class): {confusions or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with checkpoint.pt, config.yaml)")
    parser.add_argument("--tta", choices=["none", "flip"], default="none", help="the teacher's views, as in training")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--cut-score", choices=CUT_SCORES, default="class", help="what the cut reads")
    parser.add_argument("--skip", type=int, default=200, help="validation images to leave out first")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run_dir in args.runs:
        report(run_dir, args)


if __name__ == "__main__":
    main()
