"""Scale benchmark (issue 13): the Ray runner on an unlabeled pool of 10k and of 100k images.

    python bench/scale.py --sizes 10000 100000 --steps 10 --burn-in 3 --labelers 1 2

Pool: `synth` + `prepare` make a small prepared set (its labeled and val splits are used as they are); its
unlabeled rows, as `--side` px JPEG (boxes scaled), are repeated into `size` rows with unique ids and names, in
shards as `ssod prepare` writes them (ROW_SCHEMA, 256 rows, row groups of 16) listed in split.json (training
does not read unlabeled_annotations.json: it stays empty); a rerun reuses the shards. Each size runs `python -m
pipeline.cli train` on Ray (tiny model) as a child with its own Ray temp dir, whose processes are sampled each
second (/proc: VmHWM of the driver, ...TeacherLabeler... and ...RayTrainWorker... processes, their summed PSS;
the raylet's object store use and spilling); the first pseudo-labelled batch is timed by the rank-0 sink's
console lines and `pseudo_wait_seconds`, `check_run` on its own. Labelers 1 -> 2: the training's unlabeled
stream, no trainer, 1-CPU actors (Ray Data fuses the reads into them), `--label-images` rows, steady images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from ray._private.internal_api import get_memory_info_reply

from pipeline.config import load_config
from pipeline.data import schema
from pipeline.data.coco_io import write_json
from pipeline.data.prepare import ROW_GROUP_SIZE, prepare
from pipeline.data.shards import read_rows, row_groups
from pipeline.data.synth import generate
from pipeline.distributed.resources import data_context
from pipeline.distributed.streams import _block_size, _labeler_batch_bytes, _unlabeled_stream
from pipeline.distributed.weights import get_or_create_store, publish
from pipeline.machine import usable_cores
from pipeline.preflight import RunInputs, check_run
from pipeline.training.setup import build_student_teacher

CORES, SAMPLE_S, MB = usable_cores(), 1.0, 1024.0
# `ssod prepare`'s default --shard-rows; the pool's first image id; synthetic images of the base set
SHARD_ROWS, FIRST_POOL_ID, BASE_IMAGES = 256, 10**7, 200
# tests/conftest.py's tiny_config, logging every step; one CPU (one torch thread) for the student
TINY = """model.backbone=tiny model.pretrained=none model.min_size=[128] model.max_size=192 model.rois_per_image=32
data.eval_images=6 ssl.score_threshold=0.05 train.log_period=1 train.warmup_steps=2 train.device=cpu
tracking.enabled=false ray.cpus_per_worker=1""".split()
KEPT = "steps seconds train_steps_per_s stop_reason labeler_images_per_s gate_timeouts stale_rows_dropped".split()


def base_set(root: Path, images: int) -> Path:
    prepared, coco = root / "base" / "prepared", root / "base" / "coco"
    if not (prepared / schema.SPLIT_FILE).is_file():
        shutil.rmtree(root / "base", ignore_errors=True)
        generate(coco, images, seed=0)
        prepare(coco / "train" / "annotations.json", coco / "train" / "images", 10, 0, prepared,
                val_annotations=coco / "val" / "annotations.json", val_images=coco / "val" / "images")  # fmt: skip
    return prepared


def small_rows(prepared: Path, side: int) -> list[dict]:
    """The base set's unlabeled rows as `side` x `side` JPEG, boxes scaled: the pool's templates."""
    rows = []
    for row in read_rows(prepared / schema.UNLABELED_DIR):
        image, buffer = Image.open(io.BytesIO(row["image"])).convert("RGB"), io.BytesIO()
        sx, sy = side / image.width, side / image.height
        image.resize((side, side), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in row["boxes"]]
        rows.append({**row, "width": side, "height": side, "image": buffer.getvalue(), "boxes": boxes})
        rows[-1]["segmentations"] = [""] * len(boxes)
    return rows


def build_pool(root: Path, base: Path, size: int, side: int) -> tuple[Path, float]:
    """A prepared set: the base's labeled/val splits and a `size`-row unlabeled pool; (dir, seconds spent)."""
    out, started = root / f"pool_{size}_{side}px", time.perf_counter()
    if (out / schema.SPLIT_FILE).is_file():
        return out, 0.0
    for name in (schema.LABELED_DIR, schema.VAL_DIR):
        shutil.copytree(base / name, out / name, dirs_exist_ok=True)
    for name in (schema.CATEGORIES_FILE, schema.VAL_GT_FILE):
        shutil.copy(base / name, out / name)
    templates, pool_dir = small_rows(base, side), out / schema.UNLABELED_DIR
    pool_dir.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, size, SHARD_ROWS)):
        path, end = pool_dir / f"part-{index:05d}.parquet", min(start + SHARD_ROWS, size)
        if not path.exists():
            rows = [{**templates[i % len(templates)], "image_id": FIRST_POOL_ID + i, "file_name": f"pool/{i:07d}.jpg"}
                    for i in range(start, end)]  # fmt: skip
            table = pa.Table.from_pylist(rows, schema=schema.ROW_SCHEMA)
            pq.write_table(table, path.with_suffix(".tmp"), row_group_size=ROW_GROUP_SIZE)
            os.replace(path.with_suffix(".tmp"), path)
    write_json(out / schema.UNLABELED_GT_FILE, {"images": [], "annotations": [], "categories": []})
    split, ids = json.loads((base / schema.SPLIT_FILE).read_text()), list(range(FIRST_POOL_ID, FIRST_POOL_ID + size))
    write_json(out / schema.SPLIT_FILE, {**split, "unlabeled": ids, "num_unlabeled": size})  # last: complete
    return out, time.perf_counter() - started


def _proc(pid: int) -> tuple[int, str] | None:  # ppid, command line (Ray's process title)
    try:
        stat, cmd = Path(f"/proc/{pid}/stat").read_text(), Path(f"/proc/{pid}/cmdline").read_bytes()
        return int(stat.rsplit(")", 1)[1].split()[1]), cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError, ValueError):
        return None


def _memory_mb(pid: int, pss: bool) -> dict[str, float]:  # VmHWM (peak RSS); Pss (shared pages split) if asked
    try:
        text = Path(f"/proc/{pid}/status").read_text() + (Path(f"/proc/{pid}/smaps_rollup").read_text() if pss else "")
    except OSError:
        return {}
    lines = (line.split(":", 1) for line in text.splitlines() if line.startswith(("VmHWM", "Pss:")))
    return {k: int(v.split()[0]) / MB for k, v in lines}


class Sampler(threading.Thread):
    """Peak RSS per role among one run's processes (the driver, those naming its Ray temp dir, their
    descendants), the peak of their summed PSS, and the object store's use and spilling."""

    def __init__(self, tag: str, driver: int):
        super().__init__(daemon=True)
        self.tag, self.driver, self.done = tag, driver, threading.Event()
        self.peak_mb, self.roles = defaultdict(float), {}
        self.store = {"store_peak_mb": 0.0, "spilled_mb": 0.0, "spilled_objects": 0, "samples": 0}
        self.raylet, self.ticks = None, 0

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        procs = {int(p): info for p in os.listdir("/proc") if p.isdigit() and (info := _proc(int(p)))}
        roots = {pid for pid, info in procs.items() if self.tag in info[1]} | {self.driver}
        total, self.ticks = 0.0, self.ticks + 1
        for pid, (_, cmd) in procs.items():
            ancestor, depth = pid, 0
            while ancestor not in roots and ancestor in procs and depth < 6:
                ancestor, depth = procs[ancestor][0], depth + 1
            if ancestor not in roots:
                continue
            mb = _memory_mb(pid, pss=self.ticks % 5 == 0)  # smaps_rollup is costly: PSS every 5 s
            role = "driver" if pid == self.driver else "labeler" if "TeacherLabeler" in cmd else None
            role = self.roles[pid] = role or ("trainer" if "RayTrainWorker" in cmd else self.roles.get(pid, "other"))
            self.peak_mb[role] = max(self.peak_mb[role], mb.get("VmHWM", 0.0))
            total += mb.get("Pss", 0.0)
        self.peak_mb["all PSS"] = max(self.peak_mb["all PSS"], total)
        if self.ticks % 2 == 0:
            self._object_store(procs, roots)

    def _object_store(self, procs: dict, roots: set[int]) -> None:
        """Asks the raylet itself: a GCS client in this process would end it when the run's Ray goes down."""
        try:
            if self.raylet is None:
                log = next(Path(self.tag).glob("ray/session_*/logs/raylet.out")).read_text()
                port = re.search(r"NodeManager server started, listening on port (\d+)", log).group(1)
                found = (re.search(r"--node_ip_address=(\S+)", procs[p][1]) for p in roots if p in procs)
                self.raylet = (next(m.group(1) for m in found if m), int(port))
            stats = get_memory_info_reply(None, *self.raylet, timeout_seconds=5).store_stats
        except Exception:  # not up yet, or going down
            return
        s, seen = self.store, (stats.object_store_bytes_used / MB**2, stats.spilled_bytes_total / MB**2)
        for key, value in zip(("store_peak_mb", "spilled_mb", "spilled_objects"), (*seen, stats.spilled_objects_total)):
            s[key] = max(s[key], value)
        s["samples"] += 1


def run_train(args: argparse.Namespace, prepared: Path, size: int) -> dict:
    """`ssod train` on Ray into a fresh run directory, sampled while it runs."""
    tag, run_dir, steps = f"/tmp/ssod_scale_{os.getpid()}_{size}", Path(args.root) / "runs" / str(size), args.steps
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [*TINY, f"data.prepared={prepared}", f"ssl.burn_in_steps={args.burn_in}", *args.overrides]
    overrides += [f"train.{key}={args.burn_in + steps}" for key in ("steps", "eval_period", "checkpoint_period")]
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", args.config, "--output", str(run_dir)]
    cmd += [part for o in overrides for part in ("--set", o)]
    env = {**os.environ, "RAY_TMPDIR": tag, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    started, burn_in_end, first, wait, timed_out = time.perf_counter(), None, None, None, False
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    (sampler := Sampler(tag, proc.pid)).start()
    with open(run_dir / "console.log", "w") as log:
        for line in proc.stdout:
            now = time.perf_counter() - started
            log.write(f"{now:8.2f} {line}")
            if first is None and burn_in_end is not None and now - burn_in_end > args.timeout:
                proc.terminate()  # the first-batch figures become lower bounds
                first, wait, timed_out = now, now - burn_in_end, True
            try:  # the sink's JSON lines, behind Ray's "(RayTrainWorker pid=...)" prefix
                record = json.loads(line[line.index('{"step"') :])
            except ValueError:
                continue
            if record["step"] == args.burn_in and "total_loss" in record and burn_in_end is None:
                burn_in_end = now
            if "pseudo_wait_seconds" in record and first is None:
                first, wait = now, record["pseudo_wait_seconds"]
    rc, wall = proc.wait(), time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    shutil.rmtree(tag, ignore_errors=True)
    if first is None or (rc != 0 and not timed_out):
        sys.exit(f"ssod train on the {size} pool failed (rc {rc}); see {run_dir / 'console.log'}")
    metrics = {} if timed_out else json.loads((run_dir / "metrics.json").read_text())
    return {
        **{f"peak RSS {role} (MB)": sampler.peak_mb[role] for role in ("driver", "labeler", "trainer", "other")},
        "peak PSS, all processes (MB)": sampler.peak_mb["all PSS"],
        "object store peak (MB)": sampler.store["store_peak_mb"],
        "object store spilled (MB)": sampler.store["spilled_mb"],
        "first pseudo batch after run start (s)": first,
        "first pseudo batch after burn-in (s)": first - burn_in_end,
        "pseudo_wait_seconds at first batch": wait,
        "run wall time (s)": wall,
        "metrics": {"timed out": timed_out, **{k: v for k, v in metrics.items() if k in KEPT}},
        "sampling": sampler.store,
    }


def label_rates(args: argparse.Namespace, prepared: Path) -> dict[int, dict]:
    """The training's unlabeled stream with 1, 2, ... labeler actors (1 CPU each) and no trainer."""
    base = load_config(args.config, [*TINY, f"data.prepared={prepared}", *args.overrides])
    groups, _ = row_groups(prepared / schema.UNLABELED_DIR)
    groups = groups[: -(-args.label_images // ROW_GROUP_SIZE)]  # the pool's row groups are all of this size
    inputs = RunInputs(len(json.loads((prepared / schema.CATEGORIES_FILE).read_text())), 0, pool=groups)
    _, teacher = build_student_teacher(base, inputs.num_classes, torch.device("cpu"))
    tag, rates = f"/tmp/ssod_scale_{os.getpid()}_label", {}
    ray.init(num_cpus=max(args.labelers) + 2, include_dashboard=False, log_to_driver=False, _temp_dir=tag)
    for actors in args.labelers:
        cfg = base.with_overrides({"ray.num_labelers": actors, "ray.cpus_per_labeler": 1, "ssl.max_staleness": 10**9})
        store = get_or_create_store(f"scale-bench-{actors}")
        ray.get(publish(store, 0, teacher))
        with _block_size(_labeler_batch_bytes(cfg, inputs.pool)), data_context(enable_progress_bars=False):
            stream = _unlabeled_stream(cfg, inputs, f"scale-bench-{actors}").limit(args.label_images)
        started, arrivals, rows = time.perf_counter(), [], 0
        for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["image_id"])
            arrivals.append((time.perf_counter() - started, rows))
        ray.kill(store)
        (t0, r0), (t1, r1) = arrivals[0], arrivals[-1]
        rates[actors] = {"steady images/s": (r1 - r0) / (t1 - t0), "end to end images/s": r1 / t1, "first (s)": t0}
    ray.shutdown()
    shutil.rmtree(tag, ignore_errors=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=10, help="mutual-learning steps after burn-in")
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--labelers", type=int, nargs="*", default=[1, 2], help="actor counts (none: skip)")
    parser.add_argument("--label-images", type=int, default=240)
    parser.add_argument("--timeout", type=float, default=900, help="s after burn-in to wait for a pseudo batch")
    parser.add_argument("--side", type=int, default=64, help="pool images are side x side px")
    parser.add_argument("--root", default="bench/results/scale_data", help="work dir (pools, runs)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="bench/results/scale.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(args.root).resolve()
    args.root, base, results, generation = str(root), base_set(root, BASE_IMAGES), {}, {}
    for size in args.sizes:
        prepared, generation[size] = build_pool(root, base, size, args.side)
        print(f"pool {size}: {prepared} ({generation[size]:.1f} s to generate, 0 = cached)", flush=True)
        started = time.perf_counter()
        check_run(load_config(args.config, [*TINY, f"data.prepared={prepared}", f"train.output_dir={root}/preflight"]))
        results[size] = {"preflight check_run (s)": time.perf_counter() - started}
        results[size].update(run_train(args, prepared, size))
    report = {"args": vars(args), "generation_s": generation, "runs": results, "labelers": {}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))  # before the labelers' own Ray starts
    small, large = min(args.sizes), max(args.sizes)
    if timed := [s for s in args.sizes if results[s]["metrics"]["timed out"]]:
        print(f"\n{timed}: no pseudo batch {args.timeout:g} s after burn-in; the first-batch figures are lower bounds")
    print(f"\n{'figure':42s}" + "".join(f"{s:>10d}" for s in args.sizes) + f"{'ratio':>8s}")
    for name, first in results[small].items():
        if isinstance(first, (int, float)):
            ratio = results[large][name] / first if first else float("nan")
            flag = "  > 1.2x" if ratio > 1.2 else ""
            print(f"{name:42s}" + "".join(f"{results[s][name]:10.2f}" for s in args.sizes) + f"{ratio:8.2f}{flag}")
    if rates := label_rates(args, root / f"pool_{small}_{args.side}px") if args.labelers else {}:
        print(f"\nlabelers on the {small} pool, {args.label_images} images, 1 CPU per actor, {CORES} cores:")
        for actors, rate in rates.items():
            print(f"  {actors} actor(s): " + ", ".join(f"{k} {v:.2f}" for k, v in rate.items()))
        one, many = rates[min(rates)]["steady images/s"], rates[max(rates)]["steady images/s"]
        print(f"  steady ratio {max(rates)}/{min(rates)} actors: {many / one:.2f}x (goal >= 1.8x)")
        report["labelers"] = rates
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
