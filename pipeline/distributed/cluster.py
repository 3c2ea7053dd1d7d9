"""Joining a Ray cluster, or starting a local one, and waiting for an autoscaling cluster to grow.

A fresh autoscaling cluster may have no workers yet.
A plan that does not fit what the cluster has now is asked of the autoscaler (as bundles of the shapes
the run will place) and waited for, with a progress line, up to `ray.startup_timeout_s`. It is refused
at once only when it can never fit: more than the autoscaler's node types can grow to, where Ray knows
that, or a cluster with no autoscaler at all.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time

import ray

from pipeline.config import Config
from pipeline.distributed.resources import FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS, ResourcePlan, check_fits, fits
from pipeline.errors import InputError
from pipeline.machine import usable_cores

PROGRESS_EVERY_S = 10.0
_AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # written by the autoscaler's monitor on the head node


def start_ray(cfg: Config, plan: ResourcePlan) -> None:
    """Join `ray.address` / RAY_ADDRESS, or start a local Ray sized to the plan (logical CPUs); then wait
    until the plan fits."""
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_reachable(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
            ray.init(address=address)
        else:
            _start_local(cfg, plan)
    wait_for_plan(plan, cfg.ray.startup_timeout_s)


def _start_local(cfg: Config, plan: ResourcePlan) -> None:
    cores = usable_cores()
    if not cfg.ray.num_cpus and cfg.ray.num_workers > cores:
        raise InputError(
            f"ray.num_workers={cfg.ray.num_workers} DDP workers on a local Ray of a {cores}-core "
            "machine would each run a full student: lower ray.num_workers, or set "
            "ray.num_cpus to size the local Ray yourself"
        )
    os.environ.setdefault(FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS)  # the local Ray's processes inherit it
    # Ray's own processes that look a cluster up by "auto" (Train's placement-group cleaner) would find
    # every local Ray on the machine and fail when two runs share it: they are told this run's address.
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            num_cpus=cfg.ray.num_cpus or max(math.ceil(plan.cpus), cores),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}},
        )
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def max_cluster_resources() -> dict[str, float] | None:
    """What the autoscaler's node types can grow to (None where Ray was not given that config).

    The same private state call Ray Train makes to refuse a worker group that can never be placed.
    """
    from ray._private.state import state

    try:
        return state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS without the config: not knowing is not an error
        return None


def has_autoscaler() -> bool:
    """Whether a node can be added: a head started without an autoscaling config runs the monitor with
    Ray's read-only provider, whose node types are the existing nodes themselves."""
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(_AUTOSCALER_STATUS_KEY)
    if status:
        node_types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return any(kind != format_readonly_node_type(node) for node, kind in node_types.items())
    return is_autoscaler_v2(fetch_from_server=True)


def wait_for_plan(plan: ResourcePlan, timeout_s: float, poll_s: float = 1.0) -> None:
    """Return once the cluster can hold `plan`; raise InputError when it never will, or not in time."""
    if fits(plan, ray.cluster_resources()):
        return
    most = max_cluster_resources()
    if most is not None:
        check_fits(plan, most, where="can grow to")
    if not has_autoscaler():
        check_fits(plan, ray.cluster_resources())
    from ray.autoscaler.sdk import request_resources

    started = last_line = time.monotonic()
    request_resources(bundles=plan.bundles())
    try:
        while not fits(plan, have := ray.cluster_resources()):
            waited = time.monotonic() - started
            if waited > timeout_s:
                raise InputError(
                    f"resource plan needs {plan.cpus:g} CPUs and {plan.gpus:g} GPUs; after {timeout_s:g} s"
                    f" (ray.startup_timeout_s) the Ray cluster has {_amounts(have)}: the autoscaler never"
                    " added the rest (`ray status` on the head node says why)"
                )
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                print(
                    f"waiting for the autoscaler: {_amounts(have)} of {plan.cpus:g} CPUs and {plan.gpus:g}"
                    f" GPUs after {waited:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                last_line = time.monotonic()
            time.sleep(poll_s)
    finally:
        # Nodes in use are kept by the autoscaler anyway; a standing request would keep idle ones after the run.
        request_resources(bundles=[])
    print(f"the Ray cluster grew to {_amounts(have)} in {time.monotonic() - started:.0f} s", file=sys.stderr)


def _amounts(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0.0):g} CPUs and {resources.get('GPU', 0.0):g} GPUs"


def _check_reachable(address: str, key: str) -> None:
    """`ray.init` retries an address nobody answers at for minutes (seen: over 5): refuse it at once."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # "auto", "local" or a bare host: Ray resolves those itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise InputError(f"{key}={address}: no Ray cluster answers there ({exc.strerror or exc})") from None
