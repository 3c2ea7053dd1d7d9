"""Training-step time of each backbone against `tiny`, in one process (ratios survive a noisy machine).

    python bench/step_time.py [--backbones tiny efficientnet_lite0_fpn] [--threads 1] [--size 224]

One step = the Unbiased Teacher shape: 2 labeled images in two views + 2 pseudo-labeled images, forward and
backward, on random images with two boxes each. Backbones are timed in turns, so drift hits all alike.
Prints a table; weights are left random (timing does not depend on them), so nothing is read or fetched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.builders import build_detector
from models.pretrained import SUPPORTED
from models.unbiased_teacher import Batch, unbiased_teacher_step


def _batch(n: int, size: int, generator: torch.Generator) -> Batch:
    images = [torch.rand(3, size, size, generator=generator) for _ in range(n)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 120.0, 100.0]]), "labels": torch.tensor([1, 2])}
        for _ in range(n)
    ]
    return Batch(images, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["tiny", "efficientnet_lite0_fpn"])
    parser.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "mask_rcnn"])
    parser.add_argument("--size", type=int, default=224, help="image side; also the detector's min_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(0)
    labeled, pseudo = _batch(4, args.size, generator), _batch(2, args.size, generator)
    if args.arch == "mask_rcnn":
        for t in labeled.targets + pseudo.targets:
            t["masks"] = torch.zeros(2, args.size, args.size, dtype=torch.uint8)
            t["masks"][:, 10:50, 10:50] = 1
    runs = {}
    for name in args.backbones:
        # Pretrained bodies train with frozen norms and stem: time that structure (its weights need not be read).
        pretrained = "imagenet" if "imagenet" in SUPPORTED[name] else "none"
        model = build_detector(
            3,
            arch=args.arch,
            backbone=name,
            pretrained=pretrained,
            init_weights=False,
            min_size=(args.size,),
            max_size=2 * args.size,
            rois_per_image=128,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, torch.optim.SGD(params, lr=0.001))
        unbiased_teacher_step(model, runs[name][1], labeled, pseudo, 1.0)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            started = time.perf_counter()
            unbiased_teacher_step(model, optimizer, labeled, pseudo, 1.0)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times[args.backbones[0]])
    print(f"{'backbone':24s} {'step s (median)':>16s} {'x ' + args.backbones[0]:>10s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:24s} {median:16.2f} {median / base:10.2f}")


if __name__ == "__main__":
    main()
