"""Shared fixtures: one small synthetic data set (prepared once), a local Ray, tiny configs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 turns token auth on for local clusters
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The local Rays of the tests (and `ray start` in the job test) inherit this: see resources.FOOTER_ACTORS_ENV.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.prepare import prepare  # noqa: E402
from pipeline.data.synth import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root / "coco", 150, seed=3, masks=True)
    return root / "coco"


@pytest.fixture(scope="session")
def prepared(synthetic_coco: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    coco = synthetic_coco
    prepare(
        coco / "train" / "annotations.json",
        coco / "train" / "images",
        20,
        0,
        out,
        val_annotations=coco / "val" / "annotations.json",
        val_images=coco / "val" / "images",
    )
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
