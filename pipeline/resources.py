"""Resource planning: Ray Data and Ray Train share a cluster; an unschedulable plan is refused up front.

On a small machine a plan that does not leave Ray Data room for its read tasks hangs silently (seen on
2 CPUs: 2 train workers x 1 CPU + one labeler actor). So every CPU and GPU is accounted for here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray

from pipeline.config import Config
from pipeline.errors import InputError

# Read, decode and strong-view tasks of both streams.
DATA_TASK_CPUS = 1.0


@dataclass(frozen=True)
class ResourcePlan:
    train_cpus: float
    train_gpus: float
    labeler_cpus: float
    labeler_gpus: float
    data_cpus: float = DATA_TASK_CPUS

    @property
    def cpus(self) -> float:
        return self.train_cpus + self.labeler_cpus + self.data_cpus

    @property
    def gpus(self) -> float:
        return self.train_gpus + self.labeler_gpus

    def times(self, n: int) -> "ResourcePlan":
        """The plan for `n` runs side by side (concurrent Tune trials)."""
        return ResourcePlan(self.train_cpus * n, self.train_gpus * n, self.labeler_cpus * n,
                            self.labeler_gpus * n, self.data_cpus * n)

    @property
    def data_budget_cpus(self) -> float:
        """What Ray Data may use: the labeler pool plus its tasks (Train reserves its own share)."""
        return self.labeler_cpus + self.data_cpus


def plan_resources(cfg: Config) -> ResourcePlan:
    r = cfg.ray
    return ResourcePlan(
        train_cpus=r.num_workers * r.cpus_per_worker, train_gpus=r.num_workers * r.gpus_per_worker,
        labeler_cpus=r.num_labelers * r.cpus_per_labeler, labeler_gpus=r.num_labelers * r.gpus_per_labeler,
    )


def check_fits(plan: ResourcePlan, available: dict[str, float]) -> None:
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    if plan.cpus > cpus + 1e-9:
        raise InputError(
            f"resource plan needs {plan.cpus:g} CPUs (train {plan.train_cpus:g} + labelers {plan.labeler_cpus:g}"
            f" + data tasks {plan.data_cpus:g}) but the Ray cluster has {cpus:g}: lower ray.num_workers,"
            " ray.cpus_per_worker, ray.num_labelers or ray.cpus_per_labeler (fractions are allowed), or raise"
            " ray.num_cpus for a local Ray"
        )
    if plan.gpus > gpus + 1e-9:
        raise InputError(
            f"resource plan needs {plan.gpus:g} GPUs (train {plan.train_gpus:g} + labelers {plan.labeler_gpus:g})"
            f" but the Ray cluster has {gpus:g}: set ray.gpus_per_worker / ray.gpus_per_labeler to 0 for CPU"
        )


def start_ray(cfg: Config, plan: ResourcePlan) -> None:
    """Join `ray.address` / RAY_ADDRESS, or start a local Ray sized to the plan (logical CPUs)."""
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            num_cpus = cfg.ray.num_cpus or max(math.ceil(plan.cpus), os.cpu_count() or 1)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    check_fits(plan, ray.cluster_resources())
