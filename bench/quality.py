"""Quality benchmark: supervised-only vs Unbiased Teacher on the synthetic benchmark, same step budget.

    python bench/quality.py --images 2500 --percents 1 5 --seeds 0 1 --steps 800 --burn-in 400
    python bench/quality.py ... --jobs 8 --set train.device=cuda      # the grid's cells side by side on one GPU

Supervised-only is the same config with `ssl.unsup_loss_weight=0` (burn-in then plain supervised steps).
Prints a table and writes bench/results/quality.json. Not a test: it takes tens of minutes on a CPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.local import train_local
from pipeline.prepare import prepare
from pipeline.synth import generate


def _dataset(root: Path, images: int) -> Path:
    coco = root / "coco"
    if not (coco / "val" / "annotations.json").exists():
        generate(coco, images, seed=0, masks=True)  # one data set for both architectures
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
    for r in sorted(rows, key=lambda r: (r["arch"], r["percent"], r["seed"], r["method"])):
        t = r["teacher"]
        mask = t.get("segm", {}).get("AP")
        lines.append(
            f"{r['arch']:11s} {r['percent']:>5g}% {r['seed']:>4d} {r['method']:16s} {t['bbox']['AP']:6.2f} "
            f"{t['bbox']['AP50']:6.2f} {'' if mask is None else f'{mask:6.2f}':>6s} "
            f"{r['pseudo_labels_per_image']:6.2f} {r['seconds'] / 60:5.1f}"
        )
    return "\n".join(lines)


def _cell(args: argparse.Namespace, root: Path, prepared: Path, percent: float, seed: int, method: str) -> dict:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))  # cells share the cores
    run_dir = root / "runs" / f"{args.arch}_p{percent:g}_s{seed}_{method}"
    return {"arch": args.arch, "percent": percent, "seed": seed, "method": method, "steps": args.steps,
            "burn_in": args.burn_in, **_run(args, prepared, seed, method, run_dir)}


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
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (processes; e.g. on one GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per cell (default: cores / jobs)")
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args()

    root = Path(args.root)
    coco = _dataset(root, args.images)
    # Splits are made before the cells start: cells share them.
    splits = {(p, s): _split(root, coco, p, s) for p in args.percents for s in args.seeds}
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
    # spawn: a forked child cannot use CUDA once the parent has touched it
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_cell, args, root, splits[p, s], p, s, m) for (p, s) in splits for m in args.methods]
        for future in as_completed(futures):
            row = future.result()
            key = (row["arch"], row["percent"], row["seed"], row["method"])
            rows = [r for r in rows if (r["arch"], r["percent"], r["seed"], r["method"]) != key] + [row]
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(rows, indent=2))
            print(_table(rows), flush=True)


if __name__ == "__main__":
    main()
