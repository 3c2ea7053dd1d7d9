"""The pieces between labelers and trainers, without Ray: fresh rows, the credit gate, the weight store, the plan."""

import asyncio

import numpy as np
import pytest
from conftest import ROOT

from pipeline.config import load_config
from pipeline.distributed.cluster import start_ray
from pipeline.distributed.labeler import credit_window
from pipeline.distributed.resources import plan_resources
from pipeline.distributed.weights import NO_VERSION, WeightStore
from pipeline.distributed.worker import FreshRows
from pipeline.errors import InputError


def _batches(versions: list[int], size: int = 2):
    for start in range(0, len(versions), size):
        chunk = versions[start : start + size]
        yield {
            "image_id": np.arange(start, start + len(chunk)),
            "teacher_version": np.array(chunk),
            "label_seconds": np.full(len(chunk), 0.5),
        }


def test_fresh_rows_drop_stale_rows_count_them_and_report_a_dry_stream():
    fresh = FreshRows(_batches([0, 1, 8, 9, 10]), max_staleness=3)
    rows = fresh.take(2, step=11)  # versions 0 and 1 are 11 and 10 steps old
    assert [int(r["teacher_version"]) for r in rows] == [8, 9]
    assert fresh.dropped == 2 and fresh.taken == 2 and fresh.versions == {8, 9}
    assert fresh.pulled_since_last() == 4 and fresh.pulled_since_last() == 0
    assert fresh.take(2, step=11) is None  # one row left: the stream ran dry
    assert fresh.summary()["labeler_images_per_s"] == 3 / 1.5


def test_credit_gate_waits_while_labelers_run_a_window_ahead_then_counts_the_timeout():
    store = WeightStore()
    assert asyncio.run(store.acquire(4, window=4, timeout_s=1.0))
    assert not asyncio.run(store.acquire(1, window=4, timeout_s=0.1))  # 5 ahead of 0 consumed
    assert {k: store.counters()[k] for k in ("produced", "consumed", "gate_timeouts")} == {
        "produced": 5,
        "consumed": 0,
        "gate_timeouts": 1,
    }
    store.consumed(5)
    assert asyncio.run(store.acquire(4, window=4, timeout_s=0.1))


def test_a_restarted_worker_group_starts_with_fresh_credit_and_no_teacher():
    store = WeightStore()
    asyncio.run(store.acquire(8, window=4, timeout_s=0.01))
    store.begin_attempt()  # the first worker group
    store._version = 45  # it published at step 45, then a worker died
    store.begin_attempt()
    assert store.version() == NO_VERSION
    counters = store.counters()
    assert (counters["produced"], counters["consumed"], counters["gate_timeouts"]) == (0, 0, 1)  # timeouts stay
    assert counters["worker_restarts"] == 1
    assert asyncio.run(store.acquire(4, window=4, timeout_s=0.01))


def test_a_restarted_labeler_is_counted_and_its_batches_are_lost_until_a_retry_labels_them():
    store = WeightStore()
    store.begin_attempt()
    assert store.labeler_started("actor-a") == store.labeler_started("actor-b") == 1
    for actor, batch, rows in (("actor-a", "img1+2", 2), ("actor-a", "img3+2", 2), ("actor-b", "img5+2", 2)):
        asyncio.run(store.acquire(rows, window=100, timeout_s=0.01, actor_id=actor, batch=batch))
    store.delivered("actor-a", "img1+2")
    store.labeler_started("actor-a")  # killed with img3 in flight; Ray restarted it under its id
    assert (store.counters()["labeler_restarts"], store.counters()["pseudo_rows_lost"]) == (1, 2)
    assert store.counters()["produced"] == 4  # the lost batch's credit came back
    asyncio.run(store.acquire(2, window=100, timeout_s=0.01, actor_id="actor-a", batch="img3+2"))  # the retry
    assert (store.counters()["labeler_restarts"], store.counters()["pseudo_rows_lost"]) == (1, 0)
    assert store.counters()["worker_restarts"] == 0


def test_a_labeler_of_a_finished_attempt_is_let_through_uncounted():
    store = WeightStore()
    store.begin_attempt()
    old = store.labeler_started("actor-old")
    store.begin_attempt()  # a train worker died; the old streams are winding down
    assert asyncio.run(store.acquire(50, window=4, timeout_s=5.0, actor_id="actor-old", batch="b+50", attempt=old))
    counters = store.counters()
    assert (counters["produced"], counters["gate_timeouts"], counters["worker_restarts"]) == (0, 0, 1)


def test_credit_window_covers_what_is_in_flight_and_the_staleness_budget():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "ray.labeler_batch_size=2",
            "ray.num_labelers=1",
            "ray.num_workers=1",
            "ssl.max_staleness=20",
            "ssl.sync_interval=4",
            "train.batch_size_unlabeled=2",
        ],
    )
    assert credit_window(cfg) == max(2 * (1 + 1 + 2), (20 - 4) * 2)


def test_cuda_on_ray_without_gpu_workers_is_refused_by_key():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.device=cuda", "ray.gpus_per_worker=0"])
    with pytest.raises(InputError, match="ray.gpus_per_worker=0"):
        plan_resources(cfg)


def test_a_local_ray_refuses_more_ddp_workers_than_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["ray.num_workers=8", "ray.cpus_per_worker=0.25"])
    with pytest.raises(InputError, match="ray.num_workers=8"):
        start_ray(cfg, plan_resources(cfg))
