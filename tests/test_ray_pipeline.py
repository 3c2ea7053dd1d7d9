"""The distributed pipeline on a real local Ray: 2 DDP train workers, 2 labeler actors (with every remedy against
the drift: the labelers produce what the student needs), refusal."""

import json

import pytest
from conftest import PRETRAINED, tiny_config
from test_remedies import REMEDIES, assert_density_capped

from pipeline.distributed.cluster import start_ray
from pipeline.distributed.driver import train_ray
from pipeline.distributed.resources import plan_resources
from pipeline.errors import InputError
from pipeline.training.local import train_local

RAY_SETTINGS = [
    "ray.num_workers=2",
    "ray.cpus_per_worker=0.5",
    "ray.num_labelers=2",
    "ray.cpus_per_labeler=0.25",
    "ray.labeler_batch_size=1",
    "ssl.sync_interval=2",
    "ssl.max_staleness=6",
    "train.steps=14",
    "train.eval_period=7",
    "train.checkpoint_period=7",
    "train.batch_size_unlabeled=1",
]


@pytest.mark.slow
def test_two_workers_two_labelers_bounded_staleness_and_one_schedule(ray_cluster, prepared, tmp_path):
    # Credit window: max(in flight 1 x (2 labelers + 1 + 2 x 2 workers), (6 - 2) x 2 rows) = 8 rows = 4 steps,
    # so the 10 mutual-learning steps must see teachers published after the first.
    cfg = tiny_config(prepared, tmp_path / "run", *RAY_SETTINGS, *PRETRAINED, *REMEDIES)  # frozen norms under DDP
    metrics = train_ray(cfg)
    assert metrics["steps"] == 14 and metrics["stop_reason"] is None
    assert_density_capped(metrics, prepared)
    assert len(metrics["teacher_versions_seen"]) > 1, "labelers never reloaded the teacher"
    assert len(metrics["pseudo_rows_per_worker"]) == 2 and min(metrics["pseudo_rows_per_worker"]) > 0
    assert metrics["staleness_max"] <= cfg.ssl.max_staleness
    assert 0 <= metrics["staleness_mean"] <= metrics["staleness_max"]
    assert metrics["skipped_steps"] == 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["staleness_max"] == metrics["staleness_max"] and "bbox" in written["teacher"]
    assert list((tmp_path / "run" / "ray").rglob("checkpoint.pt")), "no checkpoint reported"
    assert (tmp_path / "run" / "checkpoint.pt").exists(), "the run directory has no checkpoint.pt"

    # One schedule for both runners: the same config run locally evaluates and checkpoints at the same steps
    # (the schedule does not depend on the model, so the local run uses the tiny one). Resuming on Ray is
    # test_faults' SIGTERM test.
    local_run = {"train.backend": "local", "train.output_dir": str(tmp_path / "local")}
    local = train_local(cfg.with_overrides({**local_run, "model.backbone": "tiny", "model.pretrained": "none"}))
    for key in ("steps", "checkpoint_steps"):
        assert local[key] == metrics[key], key
    assert [h["step"] for h in local["history"]] == [h["step"] for h in metrics["history"]] == [7, 14]


@pytest.mark.slow
def test_an_unschedulable_plan_is_refused_up_front(ray_cluster, prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "big", "ray.num_workers=8", "ray.cpus_per_worker=1")
    with pytest.raises(InputError, match="needs 11 CPUs"):
        start_ray(cfg, plan_resources(cfg))
    cfg = tiny_config(prepared, tmp_path / "gpu", "ray.gpus_per_worker=1", "ray.cpus_per_worker=1")
    with pytest.raises(InputError, match="GPUs"):
        start_ray(cfg, plan_resources(cfg))


def test_plan_gives_each_stream_a_budget_and_a_starting_stream_a_whole_cpu(prepared, tmp_path):
    plan = plan_resources(tiny_config(prepared, tmp_path, "ray.cpus_per_worker=2", "ray.cpus_per_labeler=0.5"))
    assert (plan.labeled_budget_cpus, plan.unlabeled_budget_cpus) == (1.0, 2.0)
    # Ray Data splits unreserved CPUs in whole CPUs: after train (2) and the labeled stream (1), the
    # unlabeled stream starts only if 2 are left for the two streams.
    assert plan.cpus == 2 + 1 + 2
    assert plan.times(3).cpus == 3 * plan.cpus and plan.times(3).unlabeled_budget_cpus == 2.0
    two_labelers = plan_resources(tiny_config(prepared, tmp_path, "ray.cpus_per_labeler=1", "ray.num_labelers=2"))
    assert two_labelers.cpus == two_labelers.train_cpus + 2 + 1 + 1.5  # labelers + both streams' tasks
