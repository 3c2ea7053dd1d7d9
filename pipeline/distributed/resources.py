"""Resource planning: Ray Data and Ray Train share a cluster; an unschedulable plan is refused up front.

On a small machine a plan that does not leave Ray Data room for its read tasks hangs silently (seen on
2 CPUs: 2 train workers x 1 CPU + one labeler actor). So every CPU and GPU is accounted for here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import Config
from pipeline.errors import InputError

# Each stream's tasks beside the labeler actors. Parquet V2's ListFiles and read tasks take a whole CPU,
# so neither budget may be smaller; the unlabeled stream also needs a strong-view task (0.25) running
# beside a read, or its rows wait behind the reads and the labelers' credit gate times out.
LABELED_STREAM_CPUS = 1.0
UNLABELED_TASK_CPUS = 1.5
VIEW_TASK_CPUS = 0.25  # a weak/strong view task of either stream
# Ray Data's coordinator reserves what each running dataset asks for, first come first served, and splits
# the CPUs nobody reserved in whole CPUs between them. The unlabeled stream starts after burn-in with no
# reservation and asks for nothing until it has throughput, so it gets going only if that split gives it
# a whole CPU: one for each of the two streams on top of the labeled stream's reservation. Without it
# the stream waits for the labeled stream to end (minutes), or for ever once that stream is
# backpressured.
STREAM_START_CPUS = 2.0
# Parquet V2 listing starts this many footer-reader actor processes (default 32) per listing, and each
# stream lists once per pass: on 2 cores that process churn takes more CPU than the student.
FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2"


@dataclass(frozen=True)
class ResourcePlan:
    """CPUs and GPUs of one run, and how many runs share the cluster (concurrent Tune trials)."""

    train_cpus: float
    train_gpus: float
    labeler_cpus: float
    labeler_gpus: float
    num_workers: int = 0  # train workers of one run, each `train_cpus / num_workers` CPUs
    num_labelers: int = 0
    runs: int = 1
    labeling: bool = False  # `ssod label`: one stream and no trainers

    @property
    def labeled_budget_cpus(self) -> float:
        """Ray Data's limit for one run's labeled stream."""
        return LABELED_STREAM_CPUS

    @property
    def unlabeled_budget_cpus(self) -> float:
        """Ray Data's limit for one run's unlabeled stream: the labeler actors and their tasks."""
        return self.labeler_cpus + UNLABELED_TASK_CPUS

    @property
    def data_cpus(self) -> float:
        """Ray Data tasks of all runs, labeler actors apart, with the headroom a starting stream needs."""
        if self.labeling:  # one stream from the start: nothing competes with it for a reservation
            return UNLABELED_TASK_CPUS * self.runs
        per_run = max(
            LABELED_STREAM_CPUS + UNLABELED_TASK_CPUS, LABELED_STREAM_CPUS + STREAM_START_CPUS - self.labeler_cpus
        )
        return per_run * self.runs

    @property
    def cpus(self) -> float:
        return (self.train_cpus + self.labeler_cpus) * self.runs + self.data_cpus

    @property
    def gpus(self) -> float:
        return (self.train_gpus + self.labeler_gpus) * self.runs

    def bundles(self) -> list[dict[str, float]]:
        """The shapes the run places, for the autoscaler: one per train worker and labeler, data tasks in
        whole CPUs."""
        data, rest = divmod(self.data_cpus, 1.0)
        return (
            [self._shape(self.train_cpus, self.train_gpus, self.num_workers)] * self.num_workers * self.runs
            + [self._shape(self.labeler_cpus, self.labeler_gpus, self.num_labelers)] * self.num_labelers * self.runs
            + [{"CPU": 1.0}] * int(data)
            + ([{"CPU": rest}] if rest > 1e-9 else [])
        )

    @staticmethod
    def _shape(cpus: float, gpus: float, n: int) -> dict[str, float]:
        return {k: v / n for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}

    def times(self, n: int) -> ResourcePlan:
        """The plan for `n` runs side by side."""
        return replace(self, runs=self.runs * n)


def plan_resources(cfg: Config) -> ResourcePlan:
    r = cfg.ray
    if cfg.train.device.startswith("cuda") and r.gpus_per_worker == 0:
        raise InputError(
            f"train.device={cfg.train.device} but ray.gpus_per_worker=0: the Ray Train workers would "
            "train on CPU; set ray.gpus_per_worker (e.g. 1) or train.device=auto"
        )
    return ResourcePlan(
        train_cpus=r.num_workers * r.cpus_per_worker,
        train_gpus=r.num_workers * r.gpus_per_worker,
        labeler_cpus=r.num_labelers * r.cpus_per_labeler,
        labeler_gpus=r.num_labelers * r.gpus_per_labeler,
        num_workers=r.num_workers,
        num_labelers=r.num_labelers,
    )


def plan_labeling(cfg: Config) -> ResourcePlan:
    """`ssod label`: the labeler actors and the read/decode tasks beside them."""
    return replace(plan_resources(cfg), train_cpus=0.0, train_gpus=0.0, num_workers=0, labeling=True)


def fits(plan: ResourcePlan, available: dict[str, float]) -> bool:
    return plan.cpus <= available.get("CPU", 0.0) + 1e-9 and plan.gpus <= available.get("GPU", 0.0) + 1e-9


def check_fits(plan: ResourcePlan, available: dict[str, float], where: str = "has") -> None:
    """Raise InputError naming the plan's parts when it does not fit `available` (what the cluster `where`)."""
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    if plan.cpus > cpus + 1e-9:
        raise InputError(
            f"resource plan needs {plan.cpus:g} CPUs (train {plan.train_cpus * plan.runs:g} + labelers"
            f" {plan.labeler_cpus * plan.runs:g} + data tasks {plan.data_cpus:g}) but the Ray cluster {where} {cpus:g}:"
            " lower ray.num_workers,"
            " ray.cpus_per_worker, ray.num_labelers or ray.cpus_per_labeler (fractions are allowed), or raise"
            " ray.num_cpus for a local Ray"
        )
    if plan.gpus > gpus + 1e-9:
        raise InputError(
            f"resource plan needs {plan.gpus:g} GPUs (train {plan.train_gpus * plan.runs:g} + labelers"
            f" {plan.labeler_gpus * plan.runs:g})"
            f" but the Ray cluster {where} {gpus:g}: set ray.gpus_per_worker / ray.gpus_per_labeler to 0 for CPU"
        )


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[None]:
    """Ray Data settings (`DataContext` attributes) for the datasets built inside: they copy the context
    when they are created. The previous values are restored on the way out."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)
