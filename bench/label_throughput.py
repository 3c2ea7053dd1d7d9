"""Auto-labeling throughput: images/s through `ssod label` (Ray Data, the TeacherLabeler actor pool, the
driver writing COCO) against a bare `torch.inference_mode` loop on the same model, batch and images.

    python bench/label_throughput.py --prepared data/demo/prepared --images 160 --batch 8 --threads 1 \
        [--set model.backbone=tiny]

The first `--images` images of the unlabeled split are written to a folder; both sides read that folder.
The bare loop decodes, runs the teacher and thresholds, batch by batch, as a labeler actor does. `ssod label`
is reported end to end (actor start-up and model load included) and steady (after its first block), with 1
and 2 actors sharing the machine's cores (or GPU). Ratios are taken inside one run: these machines are
shared and noisy. Not a test.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch
from bench_common import CORES, input_parser

from models.pseudo_labels import pseudo_label
from pipeline.config import Config, load_config
from pipeline.data.augment import to_float
from pipeline.data.readers import load_categories
from pipeline.data.rows import decode_image_bytes
from pipeline.labeling.label import LabelJob, label
from pipeline.labeling.model import LabelModel
from pipeline.training.setup import build_student_teacher, resolve_device


def write_folder(prepared: Path, n: int, folder: Path) -> list[Path]:
    """The first `n` images of the unlabeled split, as files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in sorted((prepared / "unlabeled").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["file_name", "image"]).to_pylist():
            if len(paths) == n:
                return paths
            paths.append(folder / Path(row["file_name"]).name)
            paths[-1].write_bytes(row["image"])
    return paths


def bare_loop(cfg: Config, teacher: torch.nn.Module, files: list[Path], threads: int) -> float:
    device = resolve_device(cfg.train.device)
    torch.set_num_threads(threads)
    teacher, size, threshold = teacher.to(device), cfg.ray.labeler_batch_size, cfg.ssl.score_threshold

    def run(chunk: list[Path]) -> None:
        pseudo_label(teacher, [to_float(decode_image_bytes(f.read_bytes())).to(device) for f in chunk], threshold)

    run(files[:size])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for i in range(0, len(files), size):
        run(files[i : i + size])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(files) / (time.perf_counter() - started)


def through_label(model: LabelModel, folder: Path, actors: int, threads: int, gpu: bool, out: Path) -> dict:
    """Each actor gets `threads` CPUs: Ray sets its OMP_NUM_THREADS, hence torch's threads, from them."""
    cfg = model.cfg.with_overrides(
        {
            "ray.num_labelers": actors,
            "ray.cpus_per_labeler": threads,
            "ray.gpus_per_labeler": 1.0 / actors if gpu else 0.0,
        }
    )
    job = LabelJob(out / f"actors_{actors}", images=str(folder), review=0)
    return label(LabelModel(cfg, model.categories, model.state, None, "bench"), job)


def main() -> None:
    parser = input_parser(__doc__, images=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: actors and the bare loop on the GPU")
    # On a shared 2-core machine 2 torch threads ran 4x slower than 1 (spinning OpenMP barriers), so the
    # thread count is fixed and equal on both sides.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop and of each actor")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="bench/results/label_throughput.json")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    cfg = load_config(
        args.config,
        [
            f"data.prepared={args.prepared}",
            f"ray.labeler_batch_size={args.batch}",
            f"train.device={args.device}",
            "tracking.enabled=false",
            *args.overrides,
        ],
    )
    categories = load_categories(cfg.data.prepared)
    _, teacher = build_student_teacher(cfg, len(categories), torch.device("cpu"))
    model = LabelModel(cfg, categories, {k: v.clone() for k, v in teacher.state_dict().items()}, None, "bench")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_folder(Path(cfg.data.prepared), args.images, Path(tmp) / "images")
        bare = bare_loop(cfg, teacher, files, args.threads)  # before Ray starts its processes
        ray.init(num_cpus=max(2 * CORES, 2 * args.threads + 2), include_dashboard=False, log_to_driver=False)
        runs = {n: through_label(model, Path(tmp) / "images", n, args.threads, gpu, Path(tmp)) for n in (1, 2)}
    rows = {"bare inference_mode loop": bare}
    for actors, report in runs.items():
        rows[f"ssod label, {actors} actor(s), steady"] = report["steady_images_per_s"]
        rows[f"ssod label, {actors} actor(s), end to end"] = report["images_per_s"]
    print(
        f"{len(files)} images, batch {args.batch}, {cfg.model.arch} {cfg.model.backbone} "
        f"{cfg.model.min_size[-1]} px, {args.device}, {args.threads} thread(s) per actor and bare, {CORES} cores"
    )
    print(f"{'measure':40s} {'images/s':>9s} {'x bare':>7s}")
    for name, value in rows.items():
        print(f"{name:40s} {value or 0:9.2f} {(value or 0) / bare:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "rows": rows,
                "images": len(files),
                "batch": args.batch,
                "model": f"{cfg.model.arch} {cfg.model.backbone}",
                "device": args.device,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
