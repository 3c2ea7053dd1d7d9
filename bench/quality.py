"""Quality benchmark: supervised-only vs Unbiased Teacher on the synthetic benchmark, same step budget.

    python bench/quality.py --percents 1 5 10 --seeds 0 1 --jobs 2 --threads 1
    python bench/quality.py ... --jobs 8 --set train.device=cuda      # the grid's cells side by side on one GPU

The model is `--config`'s (the demo's ImageNet-pretrained EfficientNet-Lite0 unless overridden with --set).
Supervised-only is the same config with `ssl.unsup_loss_weight=0` (burn-in then plain supervised steps).
Burn-in is identical for both methods, so it runs once per split and seed and both resume from its checkpoint.
Each cell reports the teacher's AP, AP50, mask AP, the mean AP of the three rarest classes of the training
set, pseudo-labels per image with their precision/recall against the held-aside labels, and minutes.
Prints a table and writes bench/results/quality.json. Not a test: it takes tens of minutes on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from pipeline.config import Config, load_config
from pipeline.data.prepare import prepare
from pipeline.data.synth import generate
from pipeline.machine import usable_cores
from pipeline.training.checkpoints import CHECKPOINT_NAME
from pipeline.training.local import train_local


def _dataset(root: Path, images: int, layout: str) -> Path:
    coco = root / "coco"
    if not (coco / "val" / "annotations.json").exists():
        generate(coco, images, seed=0, masks=True, layout=layout)  # one data set for both architectures
    return coco


def _split(root: Path, coco: Path, percent: float, seed: int) -> Path:
    out = root / f"prepared_p{percent:g}_s{seed}"
    if not (out / "split.json").exists():
        prepare(
            coco / "train" / "annotations.json",
            coco / "train" / "images",
            percent,
            seed,
            out,
            val_annotations=coco / "val" / "annotations.json",
            val_images=coco / "val" / "images",
        )
    return out


def rarest_classes(coco: Path, n: int = 3) -> list[str]:
    """The `n` least frequent categories of the training annotations."""
    data = json.loads((coco / "train" / "annotations.json").read_text())
    counts = Counter(a["category_id"] for a in data["annotations"])
    by_count = sorted(data["categories"], key=lambda c: counts[c["id"]])
    return [c["name"] for c in by_count[:n]]


def _mean_ap(per_class: dict[str, float | None], names: list[str]) -> float:
    return sum(per_class.get(n) or 0.0 for n in names) / len(names)


def _config(args: argparse.Namespace, prepared: Path, seed: int, out: Path, steps: int, method: str) -> Config:
    overrides = [
        f"data.prepared={prepared}",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        f"ssl.burn_in_steps={args.burn_in}",
        f"train.seed={seed}",
        f"train.eval_period={args.eval_period or args.steps}",
        f"data.eval_images={args.eval_images}",
        f"model.arch={args.arch}",
        "train.backend=local",
        "tracking.enabled=false",
        f"train.log_period={max(1, args.steps // 4)}",
    ]
    # The method's own setting comes last: a --set of the SSL weight must not turn the baseline into UT.
    method_overrides = ["ssl.unsup_loss_weight=0"] if method == "supervised" else []
    return load_config(args.config, overrides + args.set + method_overrides)


def _cell_dir(args: argparse.Namespace, root: Path, percent: float, seed: int, what: str) -> Path:
    # One folder per results file: a run directory that holds a checkpoint would be resumed.
    return root / "runs" / Path(args.out).stem / f"{args.arch}_p{percent:g}_s{seed}_{what}"


def _threads(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or max(1, usable_cores() // args.jobs))  # cells share the cores


def _exit_with_parent(parent: int) -> None:
    """Pool workers outlive a killed parent and would keep writing checkpoints a relaunch resumes from."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _burn_in(args: argparse.Namespace, root: Path, prepared: Path, percent: float, seed: int) -> dict:
    """Burn-in is the same supervised run for both methods (same seed): run it once and resume from it."""
    _threads(args)
    # Keyed by what shapes burn-in (not the SSL settings), so a grid with other SSL settings reuses it. The
    # torch thread count is part of it: on a CPU the same burn-in ends elsewhere with another thread count.
    shape = [args.config, args.arch, args.burn_in, args.eval_images, *(o for o in args.set if not o.startswith("ssl."))]
    shape.append(torch.get_num_threads())
    key = hashlib.sha1(json.dumps(shape).encode()).hexdigest()[:8]
    out = root / "runs" / "burn_in" / f"{args.arch}_p{percent:g}_s{seed}_b{args.burn_in}_{key}"
    done = out / "metrics.json"
    if done.exists():  # an earlier grid ran this burn-in: reuse it, with the minutes it took then
        metrics = json.loads(done.read_text())
    else:
        metrics = train_local(_config(args, prepared, seed, out, args.burn_in, "supervised"))
    return {
        "checkpoint": out / CHECKPOINT_NAME,
        "seconds": round(metrics["seconds"], 1),
        "teacher_AP": metrics["teacher"]["bbox"]["AP"],
    }


def _cell(
    args: argparse.Namespace,
    root: Path,
    prepared: Path,
    percent: float,
    seed: int,
    method: str,
    rare: list[str],
    burn_in: dict,
) -> dict:
    _threads(args)
    out = _cell_dir(args, root, percent, seed, method)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / CHECKPOINT_NAME).exists():
        shutil.copy(burn_in["checkpoint"], out / CHECKPOINT_NAME)
    started = time.perf_counter()
    metrics = train_local(_config(args, prepared, seed, out, args.steps, method))
    return {
        "arch": args.arch,
        "percent": percent,
        "seed": seed,
        "method": method,
        "variant": args.variant if args.variant and method != "supervised" else method,
        "steps": args.steps,
        "burn_in": args.burn_in,
        "burn_in_teacher_AP": burn_in["teacher_AP"],
        "seconds": round(burn_in["seconds"] + time.perf_counter() - started, 1),
        "teacher": metrics["teacher"],
        "student": metrics["student"],
        "rare_AP": _mean_ap(metrics["teacher"]["bbox"]["per_class"], rare),
        "rare_classes": rare,
        "pseudo_labels_per_image": metrics["pseudo_labels_per_image"],
        "pseudo_label_precision": metrics["pseudo_label_precision"],
        "pseudo_label_recall": metrics["pseudo_label_recall"],
        "history": metrics["history"],
    }


def _table(rows: list[dict]) -> str:
    def num(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        f"{'arch':11s} {'labels':>6s} {'seed':>4s} {'method':16s} {'AP':>6s} {'AP50':>6s} {'maskAP':>6s} "
        f"{'rareAP':>6s} {'PL/img':>6s} {'PLprec':>6s} {'PLrec':>6s} {'ratio':>5s} {'min':>5s}"
    ]
    supervised = {
        (r["arch"], r["percent"], r["seed"]): r["teacher"]["bbox"]["AP"] for r in rows if r["method"] == "supervised"
    }
    for r in sorted(rows, key=lambda r: (r["arch"], r["percent"], r["seed"], r["method"])):
        t = r["teacher"]
        base = supervised.get((r["arch"], r["percent"], r["seed"]))
        ratio = t["bbox"]["AP"] / base if base and r["method"] != "supervised" else None
        lines.append(
            f"{r['arch']:11s} {r['percent']:>5g}% {r['seed']:>4d} {r['method']:16s} {t['bbox']['AP']:6.2f} "
            f"{t['bbox']['AP50']:6.2f} {num(t.get('segm', {}).get('AP')):>6s} {num(r.get('rare_AP')):>6s} "
            f"{r['pseudo_labels_per_image']:6.2f} {num(r['pseudo_label_precision']):>6s} "
            f"{num(r['pseudo_label_recall']):>6s} {num(ratio):>5s} {r['seconds'] / 60:5.1f}"
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
    parser.add_argument("--eval-period", type=int, default=0, help="steps between evaluations (default: at the end)")
    parser.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "mask_rcnn"])
    parser.add_argument("--methods", nargs="+", default=["supervised", "unbiased_teacher"])
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (processes; e.g. on one GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per cell (default: cores / jobs)")
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--variant", default="", help="name of the UT arm in the results (default: the method)")
    parser.add_argument("--layout", default="standard", help="synthetic scene layout (`ssod synth --layout`)")
    args = parser.parse_args()

    root = Path(args.root)
    coco = _dataset(root, args.images, args.layout)
    # Splits are made before the cells start: cells share them.
    splits = {(p, s): _split(root, coco, p, s) for p in args.percents for s in args.seeds}
    rare = rarest_classes(coco)
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
    # spawn: a forked child cannot use CUDA once the parent has touched it
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs, mp_context=spawn, initializer=_exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        burn_ins = dict(zip(splits, pool.map(_burn_in, *zip(*[(args, root, splits[k], *k) for k in splits]))))
        futures = [
            pool.submit(_cell, args, root, splits[p, s], p, s, m, rare, burn_ins[p, s])
            for (p, s) in splits
            for m in args.methods
        ]
        for future in as_completed(futures):
            row = future.result()
            key = (row["arch"], row["percent"], row["seed"], row["method"])
            rows = [r for r in rows if (r["arch"], r["percent"], r["seed"], r["method"]) != key] + [row]
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(rows, indent=2))
            print(_table(rows), flush=True)


if __name__ == "__main__":
    main()
