"""The COCO preset's resource plan fits the shipped cluster file at its largest (bundle by bundle, per node)."""

from __future__ import annotations

import yaml
from conftest import ROOT

from pipeline.config import load_config
from pipeline.distributed.resources import plan_resources


def _largest_cluster(cluster_file: dict) -> list[dict[str, float]]:
    """One free-resources dict per node the cluster can grow to: the head and every worker type at its
    `max_workers`, within the file's global `max_workers`."""
    types = cluster_file["available_node_types"]
    head = cluster_file["head_node_type"]
    nodes = [dict(types[head].get("resources", {}))]
    budget = cluster_file.get("max_workers", float("inf"))
    for name, node_type in types.items():
        count = min(node_type.get("max_workers", 0), budget) if name != head else 0
        nodes += [dict(node_type.get("resources", {})) for _ in range(count)]
        budget -= count
    return nodes


def _place(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """First-fit, largest bundles first: the bundles no node had room for."""
    unplaced = []
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        node = next((n for n in nodes if all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items())), None)
        if node is None:
            unplaced.append(bundle)
            continue
        for k, v in bundle.items():
            node[k] -= v
    return unplaced


def test_the_coco_preset_fits_the_cluster_file_at_its_largest():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    plan = plan_resources(load_config(ROOT / "configs" / "coco_1pct.yaml"))
    nodes = _largest_cluster(cluster)
    assert plan.cpus <= sum(n.get("CPU", 0) for n in nodes) and plan.gpus <= sum(n.get("GPU", 0) for n in nodes)
    assert _place(plan.bundles(), nodes) == []


def test_the_placement_check_can_fail():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    plan = plan_resources(
        load_config(ROOT / "configs" / "coco_1pct.yaml", ["ray.num_workers=9"])  # a ninth GPU worker
    )
    assert _place(plan.bundles(), _largest_cluster(cluster)) != []
