"""Quality benchmark: supervised-only vs Unbiased Teacher on the synthetic benchmark, same step budget.

    python bench/quality.py --images 2500 --percents 1 5 --seeds 0 1 --steps 800 --burn-in 400

Supervised-only is the same config with `ssl.unsup_loss_weight=0` (burn-in then plain supervised steps).
Prints a table and writes bench/results/quality.json. Not a test: it takes tens of minutes on a CPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.local import train_local
from pipeline.prepare import prepare
from pipeline.synth import generate


def _dataset(root: Path, images: int, masks: bool) -> Path:
    coco = root / "coco"
    if not (coco / "val" / "annotations.json").exists():
        generate(coco, images, seed=0, masks=masks)
    return coco


def _split(root: Path, coco: Path, percent: float, seed: int) -> Path:
    out = root / f"prepared_p{percent:g}_s{seed}"
    if not (out / "split.json").exists():
        prepare(coco / "train" / "annotations.json", coco / "train" / "images", percent, seed, out,
                val_annotations=coco / "val" / "annotations.json", val_images=coco / "val" / "images")
    return out


def _run(args: argparse.Namespace, prepared: Path, seed: int, method: str, out: Path) -> dict:
    overrides = [
        f"data.prepared={prepared}", f"train.output_dir={out}", f"train.steps={args.steps}",
        f"ssl.burn_in_steps={args.burn_in}", f"train.seed={seed}", f"train.eval_period={args.steps}",
        f"data.eval_images={args.eval_images}", f"model.arch={args.arch}", "train.backend=local",
        "tracking.enabled=false", f"train.log_period={args.steps // 4}",
    ]
    if method == "supervised":
        overrides.append("ssl.unsup_loss_weight=0")
    started = time.perf_counter()
    metrics = train_local(load_config(args.config, overrides + args.set))
    return {"seconds": round(time.perf_counter() - started, 1), "teacher": metrics["teacher"],
            "student": metrics["student"], "pseudo_labels_per_image": metrics["pseudo_labels_per_image"],
            "pseudo_label_precision": metrics["pseudo_label_precision"],
            "pseudo_label_recall": metrics["pseudo_label_recall"]}


def _table(rows: list[dict]) -> str:
    lines = [f"{'arch':11s} {'labels':>6s} {'seed':>4s} {'method':16s} {'AP':>6s} {'AP50':>6s} {'maskAP':>6s} {'PL/img':>6s} {'min':>5s}"]
    for r in rows:
        t = r["teacher"]
        mask = t.get("segm", {}).get("AP")
        lines.append(
            f"{r['arch']:11s} {r['percent']:>5g}% {r['seed']:>4d} {r['method']:16s} {t['bbox']['AP']:6.2f} "
            f"{t['bbox']['AP50']:6.2f} {'' if mask is None else f'{mask:6.2f}':>6s} "
            f"{r['pseudo_labels_per_image']:6.2f} {r['seconds'] / 60:5.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--root", default="bench/results/quality_data")
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--percents", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--burn-in", type=int, default=400)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "mask_rcnn"])
    parser.add_argument("--methods", nargs="+", default=["supervised", "unbiased_teacher"])
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args()

    root = Path(args.root)
    coco = _dataset(root, args.images, masks=args.arch == "mask_rcnn")
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
    for percent in args.percents:
        for seed in args.seeds:
            prepared = _split(root, coco, percent, seed)
            for method in args.methods:
                run_dir = root / "runs" / f"{args.arch}_p{percent:g}_s{seed}_{method}"
                row = {"arch": args.arch, "percent": percent, "seed": seed, "method": method,
                       "steps": args.steps, "burn_in": args.burn_in, **_run(args, prepared, seed, method, run_dir)}
                rows = [r for r in rows if (r["arch"], r["percent"], r["seed"], r["method"]) != (args.arch, percent, seed, method)]
                rows.append(row)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(rows, indent=2))
                print(_table(rows), flush=True)


if __name__ == "__main__":
    main()
