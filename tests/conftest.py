"""Shared fixtures: one small synthetic data set (prepared once), a local Ray, tiny configs, the CLI as a user
runs it, and the trained run and image folder that the `ssod label` tests share."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 turns token auth on for local clusters
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The local Rays of the tests (and `ray start` in the job test) inherit this: see resources.FOOTER_ACTORS_ENV.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")

from cocofix import dataset, truncate  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.prepare import prepare  # noqa: E402
from pipeline.data.synth import generate  # noqa: E402
from pipeline.training.local import train_local  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root / "coco", 150, seed=3, masks=True)
    return root / "coco"


@pytest.fixture
def coco_set(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A small COCO file with real images (`cocofix.dataset`): (annotations path, images dir, the COCO dict)."""
    return dataset(tmp_path)


def prepare_split(coco: Path, percent: float, out: Path, annotations: Path | None = None) -> dict:
    """`prepare` (seed 0) of a `generate`d data set: its train images (labeled by `annotations`, default the
    train split's own) at `percent` % labeled, its val split as val; returns prepare's report."""
    return prepare(
        annotations or coco / "train" / "annotations.json",
        coco / "train" / "images",
        percent,
        0,
        out,
        val_annotations=coco / "val" / "annotations.json",
        val_images=coco / "val" / "images",
    )


@pytest.fixture(scope="session")
def prepared(synthetic_coco: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_split(synthetic_coco, 20, out)
    return out


def tiny_config(prepared: Path, output: Path, *overrides: str) -> Config:
    """A few seconds per step on 2 CPU cores: tiny backbone, 128 px, few ROIs, a handful of val images."""
    base = [
        "model.backbone=tiny",
        "model.pretrained=none",
        f"data.prepared={prepared}",
        f"train.output_dir={output}",
        "model.min_size=[128]",
        "model.max_size=192",
        "model.rois_per_image=32",
        "data.eval_images=6",
        "train.steps=8",
        "ssl.burn_in_steps=4",
        "ssl.score_threshold=0.05",
        "train.eval_period=4",
        "train.checkpoint_period=4",
        "train.log_period=2",
        "train.warmup_steps=2",
        "tracking.enabled=false",
        "train.device=cpu",
    ]
    return load_config(ROOT / "configs" / "demo.yaml", base + list(overrides))


def train_briefly(prepared: Path, run_dir: Path, *overrides: str) -> dict:
    """`tiny_config` cut to 2 local steps (both burn-in) scored on 2 val images; returns the metrics."""
    overrides = ("train.backend=local", "train.steps=2", "ssl.burn_in_steps=2", "data.eval_images=2", *overrides)
    return train_local(tiny_config(prepared, run_dir, *overrides))


def sets(*assignments: str) -> list[str]:
    """`--set A --set B ...`: config overrides on a command line."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def cli(
    *argv: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The `ssod` console script with ARGV in a process of its own, as a user runs it (from the repository root,
    after `prefix`), output as text. An error-message case calls `pipeline.cli.main` in the test's process."""
    return subprocess.run(
        [*prefix, str(Path(sys.executable).with_name("ssod")), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=env,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRETRAINED = ("model.backbone=efficientnet_lite0_fpn", "model.pretrained=imagenet")  # the demo's model


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


# The `ssod label` tests (test_label.py: an image folder; test_label_split.py: a prepared split) share one small
# data set, one trained Faster R-CNN run, one image folder and a threshold fitted to that run.


@pytest.fixture(scope="session")
def label_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("label_synth")
    generate(root, 40, seed=5, masks=True)
    return root


@pytest.fixture(scope="session")
def label_prepared(label_coco: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("label_prepared")
    prepare_split(label_coco, 25, out)
    return out


@pytest.fixture(scope="session")
def faster_run(label_prepared: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faster") / "run"
    train_briefly(label_prepared, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def image_folder(label_coco: Path, tmp_path_factory) -> Path:
    """Five good images (one in a subfolder, one WebP), a truncated PNG and a text file."""
    root, source = tmp_path_factory.mktemp("raw"), label_coco / "train" / "images"
    names = sorted(p.name for p in source.glob("*.png"))[:6]
    (root / "sub").mkdir()
    for name in names[:3]:
        shutil.copy(source / name, root / name)
    shutil.copy(source / names[3], root / "sub" / names[3])
    Image.open(source / names[4]).convert("RGB").save(root / "sub" / "five.webp")
    truncate(shutil.copy(source / names[5], root / "broken.png"))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def threshold(faster_run: Path, image_folder: Path) -> float:
    """The teacher's median detection score on one image: a threshold that keeps some boxes and drops some."""
    import torch

    from models.builders import build_detector
    from models.pseudo_labels import teacher_detections
    from pipeline.data.augment import to_float
    from pipeline.data.rows import decode_image_bytes
    from pipeline.labeling.model import from_checkpoint

    trained = from_checkpoint(faster_run, None, [], "teacher")
    model = build_detector(len(trained.categories), **trained.cfg.model.model_dump(), init_weights=False)
    model.load_state_dict(trained.state)
    image = to_float(decode_image_bytes((image_folder / "sub" / "five.webp").read_bytes()))
    scores = teacher_detections(model, [image])[0]["scores"]
    assert len(scores) > 10, "the teacher detected next to nothing"
    return round(float(torch.median(scores)), 4)


@pytest.fixture
def bad_files(tmp_path) -> Path:
    """Files a user might point a weights, checkpoint or config argument at by mistake."""
    import pickle

    import torch

    (tmp_path / "text.pt").write_text("these are not weights\n")
    torch.save({"model": pickle.PickleError}, tmp_path / "objects.pt")  # a pickled class, not a tensor
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:100])
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "existing").write_text("a file")
    return tmp_path
