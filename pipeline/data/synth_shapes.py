"""Class outlines and polygon geometry of the synthetic data set (`pipeline.data.synth`).

A class differs from the others by its outline only: `unit_shape` gives it in unit coordinates with
per-instance variation, `pose` jitters, stretches, rotates and scales it. The helpers below clip a
polygon to the image and measure it (area, box, how much one box covers another).
"""

from __future__ import annotations

import math

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "arrow",
    "crescent",
)
# Relative sampling weight of each class (same order as CLASS_NAMES): Zipf with exponent 1.4,
# so "circle" is 8**1.4 ~ 18x as frequent as "crescent".
CLASS_WEIGHTS: tuple[float, ...] = tuple(1.0 / (rank**1.4) for rank in range(1, len(CLASS_NAMES) + 1))

Polygon = np.ndarray  # (N, 2) float array of x, y vertices
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def circle(
    n: int, cx: float = 0.0, cy: float = 0.0, r: float = 1.0, start: float = 0.0, stop: float = 2 * math.pi
) -> Polygon:
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi - 1e-9)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _crescent(rng: np.random.Generator) -> Polygon:
    """Unit disc minus a disc of radius r shifted right by d: outer arc, then inner arc back."""
    d, r = rng.uniform(0.4, 0.6), rng.uniform(0.85, 0.95)
    x = (1 - r * r + d * d) / (2 * d)  # x of the two circle intersections
    outer = math.atan2(math.sqrt(1 - x * x), x)
    inner = math.atan2(math.sqrt(1 - x * x), x - d)
    return np.concatenate(
        [
            circle(16, start=outer, stop=2 * math.pi - outer),
            circle(12, d, 0.0, r, start=2 * math.pi - inner, stop=inner),
        ]
    )


def unit_shape(name: str, rng: np.random.Generator) -> Polygon:
    """The outline of one class in unit coordinates (about [-1, 1]), with per-instance variation."""
    if name == "circle":
        return circle(32)
    if name == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    if name == "triangle":
        return np.array([(rng.uniform(-0.4, 0.4), -1), (1, 1), (-1, 1)], dtype=float)
    if name == "star":
        radii = np.tile([1.0, rng.uniform(0.38, 0.5)], 5)
        return circle(10, start=-math.pi / 2, stop=1.5 * math.pi) * radii[:, None]
    if name == "cross":
        t = rng.uniform(0.25, 0.4)
        return np.array(
            [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        )
    if name == "hexagon":
        return circle(6)
    if name == "arrow":
        t, hw, xb = rng.uniform(0.15, 0.25), rng.uniform(0.55, 0.8), 1 - rng.uniform(0.7, 1.0)
        return np.array([(-1, -t), (xb, -t), (xb, -hw), (1, 0), (xb, hw), (xb, t), (-1, t)])
    if name == "crescent":
        return _crescent(rng)
    raise ValueError(f"unknown class {name!r}")


def pose(unit: Polygon, rng: np.random.Generator, side: float) -> Polygon:
    """Jitter, stretch and rotate a unit shape, then scale it so its longest box side is `side`."""
    pts = unit + rng.uniform(-0.03, 0.03, unit.shape)
    pts = pts * np.array([math.exp(rng.uniform(-0.29, 0.29)), 1.0])  # aspect 0.75..1.33
    a = rng.uniform(0, 2 * math.pi)
    pts = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2
    return pts * (side / np.ptp(pts, axis=0).max())


def _clip_edge(poly: list[tuple[float, float]], axis: int, limit: float, keep_below: bool) -> list[tuple[float, float]]:
    """One Sutherland-Hodgman step: keep the part of `poly` on one side of x (or y) = limit."""

    def inside(p: tuple[float, float]) -> bool:
        return p[axis] <= limit if keep_below else p[axis] >= limit

    out: list[tuple[float, float]] = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        if inside(cur) != inside(prev):
            f = (limit - prev[axis]) / (cur[axis] - prev[axis])
            cross = (prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1]))
            out.append(cross)
        if inside(cur):
            out.append(cur)
    return out


def clip_to_image(poly: Polygon, width: int, height: int) -> Polygon:
    pts = [tuple(p) for p in poly.tolist()]
    for axis, limit, below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        pts = _clip_edge(pts, axis, float(limit), below)
        if not pts:
            break
    return np.array(pts, dtype=float).reshape(-1, 2)


def polygon_area(poly: Polygon) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0])) / 2


def bounding_box(poly: Polygon) -> Box:
    (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def box_cover(earlier: Box, later: Box) -> float:
    """Share of the `earlier` box that the `later` box covers."""
    w = min(earlier[2], later[2]) - max(earlier[0], later[0])
    h = min(earlier[3], later[3]) - max(earlier[1], later[1])
    area = (earlier[2] - earlier[0]) * (earlier[3] - earlier[1])
    return max(w, 0.0) * max(h, 0.0) / max(area, 1e-6)
