"""Throughput benchmark: the Ray stages against bare loops on the same model, batch and machine.

    python bench/throughput.py --prepared data/demo/prepared --images 64 --steps 10

Rows: labeler images/s through Ray Data (actor pool, weight store, credit gate) vs a bare
`inference_mode` loop; student steps/s under Ray Train (1 and 2 workers) vs the bare local step.
Ratios are taken inside one run (these machines are shared and noisy). Not a test.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from bench_common import CORES, input_parser

from models.pseudo_labels import pseudo_label
from models.unbiased_teacher import Batch, unbiased_teacher_step
from pipeline.config import Config, load_config
from pipeline.data.augment import to_float, weak_transform
from pipeline.data.readers import load_categories, read_prepared
from pipeline.data.rows import decode_row, read_rows
from pipeline.distributed.labeler import TeacherLabeler
from pipeline.distributed.weights import get_or_create_store, publish
from pipeline.training.feed import labeled_batch, to_device
from pipeline.training.setup import build_optimizer, build_student_teacher, resolve_device


def _samples(cfg: Config, split: str, n: int) -> list:
    weak = weak_transform(cfg.data.flip_prob)
    rows = read_rows(Path(cfg.data.prepared) / split)[:n]
    return [weak(*decode_row(r)) for r in rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_labeling(cfg: Config, teacher: torch.nn.Module, n: int) -> float:
    """Decode + weak view + teacher, as the labeler actor times it."""
    rows, weak = read_rows(Path(cfg.data.prepared) / "unlabeled")[:n], weak_transform(cfg.data.flip_prob)
    device = resolve_device(cfg.train.device)
    teacher, size = copy.deepcopy(teacher).to(device), cfg.ray.labeler_batch_size
    pseudo_label(teacher, [to_float(weak(*decode_row(rows[0]))[0]).to(device)], cfg.ssl.score_threshold)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(rows), size):
        images = [to_float(weak(*decode_row(r))[0]).to(device) for r in rows[i : i + size]]
        pseudo_label(teacher, images, cfg.ssl.score_threshold)
    _sync(device)
    return len(rows) / (time.perf_counter() - started)


def ray_labeling(cfg: Config, teacher: torch.nn.Module, n: int) -> float:
    store = get_or_create_store("bench-weights")
    ray.get(publish(store, 0, teacher))
    ds = (
        read_prepared(cfg.data.prepared, "unlabeled")
        .limit(n)
        .map_batches(
            TeacherLabeler,
            batch_size=cfg.ray.labeler_batch_size,
            num_cpus=cfg.ray.cpus_per_labeler,
            num_gpus=cfg.ray.gpus_per_labeler,
            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={
                "config": cfg.model_dump(),
                "num_classes": len(load_categories(cfg.data.prepared)),
                "store_name": "bench-weights",
            },
        )
    )
    ds = ds.materialize()  # builds the actor and the model outside the timed pass
    rows = ds.take_all()
    ray.kill(store)
    return len(rows) / sum(float(r["label_seconds"]) for r in rows)


def _fixed_batch(cfg: Config) -> Batch:
    return labeled_batch([(i, t) for i, t in _samples(cfg, "labeled", cfg.train.batch_size_labeled)])


def _timed_steps(student, optimizer, batch: Batch, steps: int, device: torch.device) -> float:
    batch = to_device(batch, device)
    unbiased_teacher_step(student, optimizer, batch, None, 0.0)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        unbiased_teacher_step(student, optimizer, batch, None, 0.0)
    _sync(device)
    return steps / (time.perf_counter() - started)


def bare_steps(cfg: Config, steps: int) -> float:
    device = resolve_device(cfg.train.device)
    student, _ = build_student_teacher(cfg, len(load_categories(cfg.data.prepared)), device)
    optimizer, _ = build_optimizer(cfg, student)
    return _timed_steps(student, optimizer, _fixed_batch(cfg), steps, device)


def _worker(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    device = ray.train.torch.get_device()
    student, _ = build_student_teacher(cfg, config["num_classes"], device)
    optimizer, _ = build_optimizer(cfg, student)
    student = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"broadcast_buffers": False})
    rate = _timed_steps(student, optimizer, _fixed_batch(cfg), config["steps"], device)
    with_checkpoint = ray.train.get_context().get_world_rank() == 0
    ray.train.report({"steps_per_s": rate}, checkpoint=_marker() if with_checkpoint else None)


def _marker() -> ray.train.Checkpoint:
    import tempfile

    directory = tempfile.mkdtemp()
    Path(directory, "done").write_text("1")
    return ray.train.Checkpoint.from_directory(directory)


def ray_steps(cfg: Config, steps: int, workers: int, storage: Path) -> float:
    gpus = 1.0 if cfg.ray.gpus_per_worker else 0.0  # a GPU each: NCCL refuses two ranks on one device
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "steps": steps,
            "num_classes": len(load_categories(cfg.data.prepared)),
        },
        # All cores shared out, so Ray's OMP_NUM_THREADS gives the workers the threads the bare loop has.
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0, resources_per_worker={"CPU": max(CORES // workers, 1), "GPU": gpus}
        ),
        run_config=ray.train.RunConfig(storage_path=str(storage.resolve()), name=f"bench-{workers}-{time.time_ns()}"),
    )
    return trainer.fit().metrics["steps_per_s"]


def main() -> None:
    parser = input_parser(__doc__, images=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: labeler, workers and bare loops on the GPU")
    parser.add_argument("--out", default="bench/results/throughput.json")
    args = parser.parse_args()
    gpus = int(args.device.startswith("cuda"))
    cfg = load_config(
        args.config,
        [
            f"data.prepared={args.prepared}",
            "ssl.max_staleness=1000000",
            f"ray.cpus_per_labeler={CORES}",
            f"ray.gpus_per_labeler={gpus}",
            f"ray.gpus_per_worker={gpus}",
            f"train.device={args.device}",
            "tracking.enabled=false",
        ],
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2 * CORES, include_dashboard=False, log_to_driver=False)
    _, teacher = build_student_teacher(cfg, len(load_categories(cfg.data.prepared)), torch.device("cpu"))
    bare_label, bare_step = bare_labeling(cfg, teacher, args.images), bare_steps(cfg, args.steps)
    storage = Path("bench/results/ray")
    rows = {
        "labeler images/s (Ray Data, 1 actor)": (ray_labeling(cfg, teacher, args.images), bare_label),
        "student steps/s (Ray Train, 1 worker)": (ray_steps(cfg, args.steps, 1, storage), bare_step),
    }
    if (torch.cuda.device_count() if gpus else 2) >= 2:
        rows["student steps/s (Ray Train, 2 workers, each)"] = (ray_steps(cfg, args.steps, 2, storage), bare_step)
    print(f"{'measure':46s} {'ray':>8s} {'bare':>8s} {'ratio':>6s}")
    for name, (value, bare) in rows.items():
        print(f"{name:46s} {value:8.2f} {bare:8.2f} {value / bare:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({k: {"ray": v, "bare": b, "ratio": v / b} for k, (v, b) in rows.items()}, indent=2)
    )


if __name__ == "__main__":
    main()
